"""Rollout throughput: batched, concurrent episodes vs one episode at a time, side by side in one run.

The same work each time: ``--episodes`` episodes of the embedded mini-SWE environment (easy tasks of the
train split), ``--max-turns`` turns each, the student a tiny random-init Qwen3 (``build_tiny_qwen3``)
behind :class:`~unipost.rollout.transformers_policy.TransformersPolicy`, *sampling* up to
``--max-new-tokens`` tokens per turn. Only the engine's ``concurrency`` changes:

* concurrency 1: one episode at a time, one ``generate`` call per turn (a naive rollout loop);
* concurrency 8 / 16: that many episodes in flight, ONE batched ``generate`` per tick over all of them,
  environment steps in a thread pool.

``--recipe dagger`` runs DAgger's turn-level mixture instead (beta 0.5, the scripted expert executes
and labels turns, so environment steps run real sandboxed commands); the default ``student`` is
on-policy sampling (GRPO / OPD rollouts). A random-init model rarely emits a valid tool call, so in
``student`` mode the environment mostly answers "no tool call" and the run measures generation.

KV reuse across turns (``--kv``): each concurrency runs with the policy encoding every prompt in full
(``full``, ``prefix_cache_mb=0``, the behaviour before KV reuse) and/or reusing the episode's cached
keys/values so a turn encodes only its new suffix (``reuse``, the default policy); ``--kv both`` puts
the two side by side (interleaved). With ``--greedy`` both do the same work, which is checked: every
episode's executed actions must be identical between the two.

Prints a rich table (episodes/s, turns/s, env steps/s, student calls, mean batch, time in generation,
share of prompt tokens reused, speedup over the first row) and writes
benchmarks/results/rollout{-quick}{-tag}.{json,md}. Every row carries the machine's state over its own
measurement (``unipost.machine.QuietMonitor``: 1-minute load before/after, other processes' mean CPU
use, torch threads, ``busy``); a row during which other processes used more than a quarter of a core
is marked BUSY and warned about. These CPU machines are shared: compare ratios within one quiet run,
not across runs.

    python benchmarks/bench_rollout.py            # the recorded configuration
    python benchmarks/bench_rollout.py --quick    # a smoke run
    python benchmarks/bench_rollout.py --kv both --greedy --concurrency 8 --max-turns 6 --tag kv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from unipost.envs.embedded import EmbeddedEnv, ScriptedExpert
from unipost.machine import (
    HYGIENE_HEADERS,
    QuietMonitor,
    header_line,
    hygiene_cells,
    hygiene_note,
    machine_state,
)
from unipost.models import build_tiny_qwen3, build_tokenizer
from unipost.objective import OwnSamples, Recipe, StudentRollout, TeacherLabels, TurnMixture
from unipost.rollout.engine import RolloutEngine
from unipost.rollout.transformers_policy import TransformersPolicy

RESULTS = Path(__file__).resolve().parent / "results"


def make_env(task) -> EmbeddedEnv:
    return EmbeddedEnv.from_split(*task)


def run_once(args, student, recipe, teacher, concurrency: int, kv: str = "reuse") -> dict:
    tasks = [("train", i, "easy") for i in range(args.episodes)]
    engine = RolloutEngine(
        make_env,
        student=student,
        teacher=teacher,
        recipe=recipe,
        max_turns=args.max_turns,
        concurrency=concurrency,
        seed=args.seed,
        progress=False,
    )
    stats_before = dict(student.kv_stats)
    with QuietMonitor() as quiet:
        batch = engine.collect(tasks, iteration=0, greedy=args.greedy)
    quiet.warn_if_busy(f"rollout row (concurrency {concurrency}, KV {kv})")
    s = batch.stats
    prompt = student.kv_stats["prompt_tokens"] - stats_before["prompt_tokens"]
    reused = student.kv_stats["reused_tokens"] - stats_before["reused_tokens"]
    actions = [[t.action for t in traj.turns] for traj in batch.trajectories]
    return {
        "concurrency": concurrency,
        "kv": kv,
        "turns_per_s": s.turns / max(s.wall_time_s, 1e-9),
        "prompt_tokens": prompt,
        "reused_fraction": reused / max(prompt, 1),
        "actions": actions,
        "episodes": s.episodes,
        "turns": s.turns,
        "student_turns": s.student_queries,
        "student_calls": s.student_calls,
        "mean_batch": s.student_queries / max(s.student_calls, 1),
        "wall_s": s.wall_time_s,
        "student_s": s.student_time_s,
        "env_s": s.env_time_s,
        "episodes_per_s": s.episodes_per_s,
        "env_steps_per_s": s.env_steps_per_s,
        "teacher_fraction": s.teacher_fraction,
        "tool_error_rate": s.tool_error_rate,
        **quiet.record(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--recipe", choices=["student", "dagger"], default="student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--kv", choices=["both", "reuse", "full"], default="both", help="KV reuse across turns (see above)"
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same work for both --kv)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--quick", action="store_true", help="8 episodes, 2 turns, 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.max_turns, args.max_new_tokens = 8, 2, 16
        args.concurrency = [1, 8]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    state_at_start = machine_state()

    tokenizer = build_tokenizer()
    model = build_tiny_qwen3(len(tokenizer), seed=args.seed).eval()
    students = {
        kv: TransformersPolicy(
            model,
            tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            seed=args.seed,
            prefix_cache_mb=0 if kv == "full" else 1024,
        )
        for kv in (["full", "reuse"] if args.kv == "both" else [args.kv])
    }
    if args.recipe == "dagger":
        recipe, teacher = Recipe(TurnMixture(0.5), TeacherLabels()), ScriptedExpert()
    else:
        recipe, teacher = Recipe(StudentRollout(), OwnSamples()), None

    # warm-up (first generate call pays one-off costs), not timed
    warm = argparse.Namespace(**{**vars(args), "episodes": 2, "max_turns": 1})
    for student in students.values():
        run_once(warm, student, recipe, teacher, 2)

    rows = [
        run_once(args, student, recipe, teacher, c, kv)
        for c in args.concurrency
        for kv, student in students.items()
    ]
    base = rows[0]
    for r in rows:
        r["speedup"] = r["episodes_per_s"] / base["episodes_per_s"]
    same_work = None
    if args.greedy and len(students) == 2:
        same_work = all(
            r["actions"] == other["actions"]
            for r in rows
            for other in rows
            if r["concurrency"] == other["concurrency"]
        )
    for r in rows:
        del r["actions"]

    title = (
        f"rollout throughput: {args.episodes} episodes x {args.max_turns} turns, recipe {args.recipe}, "
        f"sampling {args.max_new_tokens} new tokens, tiny Qwen3, embedded env (easy)"
    )
    table = Table(title=title)
    headers = [
        "concurrency",
        "KV",
        "episodes/s",
        "turns/s",
        "env steps/s",
        "student calls",
        "mean batch",
        "wall s",
        "in generate s",
        "prompt tokens reused",
        "speedup",
        *HYGIENE_HEADERS,
    ]
    for h in headers:
        table.add_column(h, justify="right")
    md = [
        f"**{title}**",
        "",
        f"At the start: {header_line(state_at_start)}.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---:|" * len(headers),
    ]
    for r in rows:
        cells = [
            str(r["concurrency"]),
            r["kv"],
            f"{r['episodes_per_s']:.2f}",
            f"{r['turns_per_s']:.2f}",
            f"{r['env_steps_per_s']:.1f}",
            str(r["student_calls"]),
            f"{r['mean_batch']:.1f}",
            f"{r['wall_s']:.1f}",
            f"{r['student_s']:.1f}",
            f"{r['reused_fraction']:.0%}",
            f"{r['speedup']:.2f}x",
            *hygiene_cells(r),
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=max(Console().width, 160)).print(table)
    note = hygiene_note(rows)
    print(note)

    config = {
        **{k: v for k, v in vars(args).items() if k != "quick"},
        "model": {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers},
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine_at_start": state_at_start,
    }
    md += ["", note]
    if same_work is not None:
        md += ["", f"Greedy: executed actions identical with and without KV reuse: {same_work}."]
        print(f"greedy: executed actions identical with and without KV reuse: {same_work}")
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"rollout{suffix}.json").write_text(
        json.dumps({"config": config, "rows": rows, "greedy_same_actions": same_work}, indent=2) + "\n"
    )
    (RESULTS / f"rollout{suffix}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
