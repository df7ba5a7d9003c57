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

``--recipe labels`` measures what DAgger's teacher labels cost when the teacher is an API
(``benchmarks/latency_teacher.py`` in a subprocess: a real local OpenAI-compatible server answering after
``--latency-ms`` (default 300-800 ms, drawn per state), at most ``--teacher-cap`` calls at once), behind
:class:`~unipost.rollout.openai_policy.OpenAIChatPolicy`. Three rows, the same episodes (beta 0: the
student executes every turn, the same seed, so every row must execute identical actions, checked):

* student-only: the student's rollout alone (GRPO-like: no teacher);
* DAgger labels synchronous: the teacher labels every state, and each tick waits for its labels;
* DAgger labels deferred: the same labels off the critical path (``unipost.rollout.label_queue``).

The labelling overhead is each DAgger row's wall time over the student-only row's; the deferred row's
labels must equal the synchronous row's (checked). ``--rounds`` repeats the three rows, interleaved.

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
    python benchmarks/bench_rollout.py --recipe labels --threads 1   # DAgger's API-label overhead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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
from unipost.rollout.openai_policy import OpenAIChatPolicy
from unipost.rollout.transformers_policy import TransformersPolicy
from unipost.train.warm_start import MAX_NEW_TOKENS, MAX_TURNS

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


LABEL_ROWS = ("student-only", "DAgger labels synchronous", "DAgger labels deferred")


def start_latency_teacher(args) -> tuple[subprocess.Popen, str]:
    """benchmarks/latency_teacher.py in its own process (its threads never hold our interpreter)."""
    lo, hi = args.latency_ms
    server = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "latency_teacher.py"),
            *("--min-ms", str(lo), "--max-ms", str(hi), "--cap", str(args.teacher_cap)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline() if server.stdout else ""
    if not line.startswith("PORT "):
        server.kill()
        raise RuntimeError(f"latency teacher did not start (said {line!r})")
    return server, f"http://127.0.0.1:{int(line.split()[1])}"


def label_setup(args) -> tuple[object, object, object, str]:
    """(env factory, task of index i, fresh-student factory, description) for ``--student``.

    ``lab``: the main job's student, the shipped warm start (1.9M parameters, it makes real tool calls
    and finishes episodes) in the lab's environment and sampling settings (``unipost.train.lab``);
    ``random``: the random-init tiny Qwen3 of the other rows (336k parameters, mostly malformed calls).
    """
    if args.student == "random":
        tokenizer = build_tokenizer()
        model = build_tiny_qwen3(len(tokenizer), seed=args.seed).eval()

        def make_random() -> TransformersPolicy:
            return TransformersPolicy(
                model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed
            )

        return make_env, lambda i: ("train", i, "easy"), make_random, "random-init tiny Qwen3 (336k)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipost.envs.registry import make_env_factory
    from unipost.train.lab import tiny_config, warm_start

    root = Path(warm_start()["root"]) / "student"
    config = tiny_config(rollout={"max_new_tokens": args.max_new_tokens})
    model = AutoModelForCausalLM.from_pretrained(root).eval()
    tokenizer = AutoTokenizer.from_pretrained(root)

    def make_lab() -> TransformersPolicy:
        return TransformersPolicy(model, tokenizer, sampling=config.rollout.sampling(), seed=args.seed)

    return make_env_factory(config.env), lambda i: ("train", i), make_lab, "the lab's warm start (1.9M)"


def run_label_row(args, setup, url: str, row: str) -> dict:
    """One row of the labels comparison: a fresh student (same seed) and, for DAgger, a fresh teacher."""
    env_factory, task, make_student, _ = setup
    tasks = [task(i) for i in range(args.episodes)]
    teacher = None
    if row == "student-only":
        recipe = Recipe(StudentRollout(), OwnSamples())
    else:
        recipe = Recipe(TurnMixture(args.beta), TeacherLabels())
        teacher = OpenAIChatPolicy(url, "latency-teacher", api_key="none", concurrency=args.teacher_cap)
    engine = RolloutEngine(
        env_factory,
        student=make_student(),
        teacher=teacher,
        recipe=recipe,
        max_turns=args.max_turns,
        concurrency=args.concurrency[0],
        seed=args.seed,
        progress=False,
        defer_labels=row.endswith("deferred") if teacher is not None else None,
    )
    try:
        with QuietMonitor() as quiet:
            batch = engine.collect(tasks, iteration=0, greedy=args.greedy)
    finally:
        if teacher is not None:
            teacher.close()
    quiet.warn_if_busy(f"labels row {row!r}")
    s = batch.stats
    return {
        "row": row,
        "wall_s": s.wall_time_s,
        "student_s": s.student_time_s,
        "teacher_wait_s": s.teacher_wait_s,
        "label_drain_s": s.label_drain_s,
        "ticks": s.ticks,
        "ticks_blocked_on_teacher": s.ticks_blocked_on_teacher,
        "teacher_queries": s.teacher_queries,
        "teacher_requests": s.teacher_requests,
        "label_cache_hits": s.label_cache_hits,
        "turns": s.turns,
        "episodes": s.episodes,
        "teacher_turns": s.teacher_turns,
        "actions": [[t.action for t in traj.turns] for traj in batch.trajectories],
        "labels": [[t.label for t in traj.turns] for traj in batch.trajectories],
        **quiet.record(),
    }


def main_labels(args) -> None:
    """``--recipe labels``: student-only vs DAgger's synchronous vs deferred API labels, side by side."""
    torch.set_num_threads(args.threads)
    state_at_start = machine_state()
    setup = label_setup(args)
    server, url = start_latency_teacher(args)
    try:
        warm = argparse.Namespace(**{**vars(args), "episodes": 2, "max_turns": 1})
        for row in LABEL_ROWS:  # one-off costs (first generate, connections), not timed
            run_label_row(warm, setup, url, row)
        rows = [
            {**run_label_row(args, setup, url, row), "round": r}
            for r in range(args.rounds)
            for row in LABEL_ROWS
        ]
    finally:
        server.terminate()
        server.wait(timeout=10)

    lo, hi = args.latency_ms
    same_episodes = all(r["actions"] == rows[0]["actions"] for r in rows) if args.beta == 0 else None
    sync_labels = [r["labels"] for r in rows if r["row"] == LABEL_ROWS[1]]
    deferred_labels = [r["labels"] for r in rows if r["row"] == LABEL_ROWS[2]]
    labels_identical = all(d == sync_labels[0] for d in sync_labels + deferred_labels) and all(
        label is not None for episode in deferred_labels[0] for label in episode
    )
    for r in rows:
        base = next(b for b in rows if b["round"] == r["round"] and b["row"] == LABEL_ROWS[0])
        r["overhead"] = r["wall_s"] / base["wall_s"] - 1.0
        # the labels' cost on the critical path, robust to the load noise in the wall times
        r["wait_share"] = r["teacher_wait_s"] / base["wall_s"]
        del r["actions"], r["labels"]
    overhead, wait_share = (
        {row: sum(r[key] for r in rows if r["row"] == row) / args.rounds for row in LABEL_ROWS[1:]}
        for key in ("overhead", "wait_share")
    )
    # no scheduling beats the API's throughput: its calls over its cap, at the mean latency
    api_bound_s = rows[1]["teacher_requests"] * (lo + hi) / 2000.0 / args.teacher_cap

    title = (
        f"DAgger's API labels: {args.episodes} episodes x {args.max_turns} turns, beta {args.beta}, "
        f"concurrency {args.concurrency[0]}, teacher {lo:g}-{hi:g} ms per call, at most {args.teacher_cap} "
        f"at once; student {setup[3]} sampling up to {args.max_new_tokens} tokens, embedded env (easy)"
    )
    headers = [
        "round",
        "row",
        "wall s",
        "overhead vs student-only",
        "in generate s",
        "waited on teacher s",
        "of which final drain s",
        "waited / student-only wall",
        "ticks blocked / ticks",
        "teacher requests",
        *HYGIENE_HEADERS,
    ]
    table = Table(title=title)
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
            str(r["round"]),
            r["row"],
            f"{r['wall_s']:.1f}",
            "-" if r["row"] == LABEL_ROWS[0] else f"{r['overhead']:+.1%}",
            f"{r['student_s']:.1f}",
            f"{r['teacher_wait_s']:.1f}",
            f"{r['label_drain_s']:.1f}",
            "-" if r["row"] == LABEL_ROWS[0] else f"{r['wait_share']:.1%}",
            f"{r['ticks_blocked_on_teacher']} / {r['ticks']}",
            str(r["teacher_requests"]),
            *hygiene_cells(r),
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=max(Console().width, 160)).print(table)
    note = hygiene_note(rows)
    checks = (
        f"Same episodes in every row: {same_episodes}. "
        f"Deferred labels == synchronous labels: {labels_identical}. "
        f"The API's throughput bound ({rows[1]['teacher_requests']} labels x {(lo + hi) / 2:g} ms mean "
        f"/ {args.teacher_cap} at once): {api_bound_s:.1f} s. Mean overhead over {args.rounds} round(s): "
        + ", ".join(f"{row} {v:+.1%}" for row, v in overhead.items())
        + "; time blocked on the teacher over the student-only wall: "
        + ", ".join(f"{row} {v:.1%}" for row, v in wait_share.items())
        + "."
    )
    print(note)
    print(checks)
    md += ["", note, "", checks]
    config = {
        **{k: v for k, v in vars(args).items() if k != "quick"},
        "student_model": setup[3],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine_at_start": state_at_start,
    }
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "config": config,
        "rows": rows,
        "same_episodes": same_episodes,
        "labels_identical": labels_identical,
        "api_throughput_bound_s": api_bound_s,
        "mean_overhead": overhead,
        "mean_wait_share": wait_share,
    }
    (RESULTS / f"rollout-labels{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"rollout-labels{suffix}.md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--max-turns", type=int, default=None, help="default 4 (labels, lab student: 10)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default 48 (labels, lab student: 128)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--recipe", choices=["student", "dagger", "labels"], default="student")
    parser.add_argument(
        "--latency-ms", type=float, nargs=2, default=[300.0, 800.0], help="labels: the API's latency range"
    )
    parser.add_argument("--teacher-cap", type=int, default=8, help="labels: API calls answered at once")
    parser.add_argument("--beta", type=float, default=0.0, help="labels: DAgger's teacher-executed share")
    parser.add_argument("--rounds", type=int, default=1, help="labels: repeats of the three rows")
    parser.add_argument(
        "--student", choices=["lab", "random"], default="lab", help="labels: the student (see label_setup)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--kv", choices=["both", "reuse", "full"], default="both", help="KV reuse across turns (see above)"
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same work for both --kv)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--quick", action="store_true", help="8 episodes, 2 turns, 16 tokens")
    args = parser.parse_args()
    lab = args.recipe == "labels" and args.student == "lab"
    args.max_turns = args.max_turns or (MAX_TURNS if lab else 4)
    args.max_new_tokens = args.max_new_tokens or (MAX_NEW_TOKENS if lab else 48)
    if args.quick:
        args.episodes, args.max_turns, args.max_new_tokens = 8, 2, 16
        args.concurrency = [1, 8]
    if args.recipe == "labels":  # one concurrency: 8 unless one value is given
        args.concurrency = args.concurrency if len(args.concurrency) == 1 else [8]
        return main_labels(args)
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
