"""The paper's method comparison at CPU scale: base, SFT, GRPO, OPD, DAgger, AggreVaTe (paper §4.3-4.4).

Every arm is the tiny lab (:func:`unipost.train.lab.tiny_config`: the shipped, hash-checked warm start
as the student and its longer-trained sibling as the white-box teacher, easy embedded tasks, the lab's
rollout and optimiser settings); this script sets only the benchmark's budgets (``BenchSize``) and the
recipe. Every arm of a seed loads the SAME warm start, sees the same seeded training-task draws and
held-out tasks, rolls out the same number of episodes per iteration, and trains until the same matched
effective-sample budget (``TrainConfig.max_effective_samples``: labelled transitions trained on, the
count the trainer logs as ``train/effective_samples``; the last batch is trimmed to the shortest prefix
that reaches it). Only the recipe differs. "base" is the warm start evaluated without training.

Outputs (printed as rich tables and written to ``--out``, default ``benchmarks/results/methods``):

* ``results.{json,csv,md}``: Table-3-style held-out resolve rate per method, pooled over seeds with a
  Wilson 95% interval on the pooled episodes (tasks x seeds), plus the secondary metrics;
* ``failure_modes.{csv,md}``: Table-4-style failure modes, pooled over seeds (each block's fractions
  are of that block, as in the paper);
* ``learning_curves.png``: held-out resolve rate and expert agreement vs effective samples (Fig. 1 left);
* ``reverse_kl.png``: reverse KL(pi_student || pi_teacher) on student-visited states vs effective samples
  (§4.4);
* ``paired.{json,md}``: every arm against base, and the paper's ordering pairs, compared *paired* on the
  same held-out tasks (every arm of a seed is evaluated on that seed's tasks): difference in resolve
  rate with a 95% bootstrap interval over tasks pooled over seeds (each task's per-seed outcomes kept
  together), exact McNemar p, tasks gained / lost (:func:`unipost.eval.paired_comparison`);
* ``claims.json``: the paper's ordering claims, each judged from the paired interval as holds / does not
  hold / inconclusive (never hard-coded), and the reverse-KL rebound claim. Unpaired intervals
  (Newcombe's, used before) ignore that both arms saw the same tasks and are far too wide: they once
  hid a significant regression. A ``histories.json`` from before per-task outcomes were recorded is
  reported with Newcombe's interval, marked as such (``basis``), and a message saying to rerun;
* ``histories.json``: every run's metric history, its final evaluation's per-task outcomes (``outcomes``)
  and the run's settings (for re-plotting and ``--report-only``).

Secondary metrics (clearly secondary; resolve rate stays primary): at every greedy held-out student
state the scripted expert is asked (never executed) for its next tool call; ``expert_agreement`` is the
fraction of student turns that make exactly that call, ``expert_prefix`` the mean number of turns the
student follows the expert before its first deviation (how far into the episode it gets before
covariate shift starts).

    python benchmarks/bench_methods.py                 # FULL: 3 seeds x 50 held-out tasks (hours; README)
    python benchmarks/bench_methods.py --quick --assets DIR   # the test suite's smoke run (seconds)
    python benchmarks/bench_methods.py --report-only   # re-summarise --out/histories.json, no training
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("base", "sft", "grpo", "opd", "dagger", "aggrevate")
TITLES = {
    "base": "base",
    "sft": "SFT",
    "grpo": "GRPO",
    "opd": "OPD",
    "dagger": "DAgger",
    "aggrevate": "AggreVaTe",
}
# The paper's ordering (Table 3): DAgger > OPD ~ AggreVaTe > SFT > GRPO > base, as adjacent pairs.
PAPER_ORDER = (
    ("dagger", "opd"),
    ("dagger", "aggrevate"),
    ("opd", "sft"),
    ("aggrevate", "sft"),
    ("sft", "grpo"),
    ("grpo", "base"),
)
Z95 = 1.959963984540054
_MECH = (
    "eval/first_tool_error_turn",
    "eval/episodes_with_tool_error",
    "eval/recovery_rate",
    "eval/tool_error_rate_after_first",
    "eval/tool_error_after_error",
)  # unipost.eval.MECHANISM_KEYS as logged (the script imports unipost lazily)


@dataclass(frozen=True)
class BenchSize:
    """What sets the benchmark's cost; everything else is the lab's (``tiny_config``). ``QUICK``, ``FULL``."""

    seeds: int
    heldout: int  # held-out tasks per seed (disjoint across seeds)
    budget: int  # matched effective-sample budget (labelled transitions) per run
    iterations: int  # upper bound on iterations (the budget normally ends a run first)
    episodes: int  # episodes per iteration in every arm (GRPO: episodes // grpo_group tasks x the group)
    grpo_group: int
    eval_every: int  # iterations between held-out evaluations (1: a learning-curve point per iteration)
    kl_tasks: int  # sampled student rollouts per evaluation for the reverse-KL diagnostic
    quick: bool = False  # the lab's seconds-long budgets (tiny_config(quick=True)): turns, tokens, epochs
    filter_unsubmitted: bool = True  # the paper's filter for OPD / DAgger / AggreVaTe (see recipe_for)


QUICK = BenchSize(  # seconds per run on a --quick warm start; the pipeline is the real one
    seeds=2,
    heldout=1,
    budget=4,
    iterations=1,
    episodes=2,
    grpo_group=2,
    eval_every=1,
    kl_tasks=1,
    quick=True,
    # measured: the --quick warm start (1 layer x 32, 6 demos) submits on 0% of episodes (its manifest's
    # validation: 12 turns, all tool errors), so the filter would leave the on-policy arms no data and
    # the smoke run could not check the budget logic
    filter_unsubmitted=False,
)
FULL = BenchSize(  # >= 3 seeds x >= 50 held-out tasks, >= 4 evaluation points per learning curve
    seeds=3,
    heldout=50,
    # > 2 x episodes x max_turns (with the lab's MAX_TURNS = 10: at most 2 x 8 x 10 = 160 labels in two
    # iterations): no arm can spend it in fewer than 3 iterations, so with eval_every=1 each curve has
    # >= 4 points (before training and after each iteration); checked by tests/test_bench_methods.py
    budget=240,
    iterations=12,  # an arm whose filter keeps little data stops here short of the budget (reported)
    episodes=8,
    grpo_group=4,
    eval_every=1,
    kl_tasks=4,
)


def arm_config(
    size: BenchSize,
    runs_dir: str,
    seed: int,
    method: str,
    *,
    assets: str | None = None,
    progress: bool = False,
):
    """One arm's TrainConfig: the lab's, with the benchmark's budgets, seed and recipe name.

    The recipe's arguments that a config can carry are in ``recipe_kwargs`` (the saved config.json
    names them); :func:`recipe_for` builds the object the Trainer runs.
    """
    from unipost.train.lab import tiny_config

    tasks = max(1, size.episodes // size.grpo_group) if method == "grpo" else size.episodes
    return tiny_config(
        runs_dir,
        recipe=method if method != "base" else "sft",
        quick=size.quick,
        assets=assets,
        name=f"{method}-s{seed}",
        seed=seed,
        iterations=size.iterations,
        max_effective_samples=size.budget,
        recipe_kwargs=recipe_kwargs(method, size),
        env={"heldout_tasks": size.heldout},
        rollout={"episodes_per_iteration": tasks},
        eval={"every": size.eval_every, "kl_tasks": size.kl_tasks, "expert_labels": True},
        progress=progress,
    )


def recipe_kwargs(method: str, size: BenchSize) -> dict[str, Any]:
    """The named recipe's arguments (JSON, as a saved config holds them)."""
    from unipost.train.lab import LAB_BETA

    if method in ("sft", "base"):
        return {}  # rejection sampling: only resolved expert trajectories
    if method == "grpo":
        return {"group_size": size.grpo_group}
    if method == "opd":
        return {"filter_unsubmitted": size.filter_unsubmitted}
    if method == "dagger":
        return {"beta": dict(LAB_BETA), "filter_unsubmitted": size.filter_unsubmitted}
    if method == "aggrevate":
        return {"filter_unsubmitted": size.filter_unsubmitted}
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def recipe_for(method: str, size: BenchSize, max_turns: int):
    """The recipe object of one arm: the library's named recipe with :func:`recipe_kwargs`.

    ``filter_unsubmitted`` is the paper's (True: OPD, DAgger and AggreVaTe drop trajectories without a
    submission) in ``FULL``: the lab's warm start submits on a good share of its episodes, unlike the
    earlier tiny students that never did (when the filter was switched off here). ``QUICK`` turns it
    off because its --quick warm start never submits (measured, see ``QUICK``); ``--keep-unsubmitted``
    does the same for a full run, and the results record which was used.

    DAgger uses the lab's beta_i = max(0.2, 0.6 - 0.2 i) (``unipost.train.lab.LAB_BETA``, as in the main
    job). AggreVaTe's prefix law is the library's ShiftingPrefix with its support cut to the episode
    (1 .. max_turns - 2, so a teacher always completes); the run's config.json records that arm as
    ``recipe="custom"`` with the composition part by part (``Recipe.to_spec``), and the results'
    ``recipes`` hold every arm's ``Recipe.describe()``.
    """
    from unipost.objective import AggreVaTe, ShiftingPrefix, get_recipe

    kwargs = recipe_kwargs(method, size)
    if method == "aggrevate":
        return AggreVaTe(ShiftingPrefix(1, max(2, max_turns - 2), 0.5), **kwargs)
    return get_recipe(method, **kwargs)


def heldout_for(seed: int, size: BenchSize) -> list[tuple[str, int]]:
    """Each seed evaluates on its own held-out tasks, so pooled intervals cover tasks x seeds."""
    return [("heldout", seed * size.heldout + i) for i in range(size.heldout)]


def run_settings(size: BenchSize, methods, *, assets: str | None = None) -> dict[str, Any]:
    """What a reader needs to know about the runs (saved with the histories): the warm start's identity,
    the lab's per-run settings and each arm's recipe."""
    from unipost.train.lab import warm_start

    cfg = arm_config(size, "runs", 0, "sft", assets=assets)
    manifest = warm_start(assets)
    trained = [m for m in methods if m != "base"]
    return {
        "size": asdict(size),
        "warm_start": {
            "root": manifest["root"],
            "command": manifest.get("command"),
            "student_sha256": manifest["sha256"].get("student/model.safetensors"),
            "spec": manifest.get("spec"),
            "validation": manifest.get("validation"),
        },
        "max_turns": cfg.rollout.max_turns,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "context_budget": cfg.rollout.context_budget,
        "epochs_per_batch": cfg.optim.epochs_per_batch,
        "lr": cfg.optim.lr,
        "episodes_per_iteration": {
            m: arm_config(size, "runs", 0, m, assets=assets).rollout.episodes_per_iteration
            * (size.grpo_group if m == "grpo" else 1)
            for m in trained
        },
        "recipes": {m: recipe_for(m, size, cfg.rollout.max_turns).describe() for m in trained},
    }


def run_seed(
    size: BenchSize,
    seed: int,
    trained: list[str],
    *,
    runs_dir: Path,
    assets: str | None,
    histories: dict[str, dict[int, list[dict]]],
    minutes: dict[str, float],
    on_run_done=None,
    outcomes: dict[str, dict[int, dict]] | None = None,
) -> None:
    """Every trained arm of one seed, in order, into ``histories[method][seed]`` (resumable).

    An arm already present in ``histories`` (a resumed run) is not trained again. Every arm of a seed
    starts from the same warm start, so the warm start is evaluated once (by the first arm) and reused.
    ``outcomes[method][seed]`` receives the per-task outcomes of the arm's final evaluation (base: the
    first arm's step 0), read from the evaluation files the Trainer saves in its run folder.
    """
    from unipost.eval import EVAL_OUTCOMES_DIR, load_eval_outcomes
    from unipost.machine import QuietMonitor
    from unipost.train.trainer import Trainer

    outcomes = {} if outcomes is None else outcomes

    def saved(trainer, step: float) -> dict:
        ev = load_eval_outcomes(trainer.run_dir / EVAL_OUTCOMES_DIR, int(step))
        return {"step": ev.step, "resolved": ev.task_outcomes()}

    initial = None
    for method in trained:
        done = histories.get(method, {}).get(seed)
        if done:
            initial = initial or {
                k: v for k, v in done[0].items() if k != "step" and not k.startswith("machine/")
            }
    for method in trained:
        if histories.get(method, {}).get(seed):
            continue
        cfg = arm_config(size, str(runs_dir), seed, method, assets=assets)  # quiet: one live bar
        start = time.perf_counter()
        trainer = Trainer(
            cfg,
            recipe=recipe_for(method, size, cfg.rollout.max_turns),
            heldout_tasks=heldout_for(seed, size),
        )
        with QuietMonitor() as quiet:
            hist = trainer.fit(initial_eval=initial)
        # the machine's state over this arm rides on its last record (``machine_note`` reports it)
        hist[-1] = {**hist[-1], **{f"machine/{k}": v for k, v in quiet.record().items()}}
        minutes[method] = minutes.get(method, 0.0) + (time.perf_counter() - start) / 60
        outcomes.setdefault(method, {})[seed] = saved(trainer, _evals(hist)[-1]["step"])
        if initial is None:
            initial = {k: v for k, v in hist[0].items() if k != "step" and not k.startswith("machine/")}
            if "base" in histories:  # this arm evaluated the warm start itself: its step-0 outcomes
                outcomes.setdefault("base", {})[seed] = saved(trainer, 0)
        if "base" in histories:
            histories["base"][seed] = [{"step": 0, **initial}]
        histories[method][seed] = hist
        if on_run_done is not None:
            on_run_done(method)


def run_benchmark(
    size: BenchSize,
    *,
    out: Path,
    runs_dir: Path,
    methods=METHODS,
    assets: str | None = None,
    progress: bool = True,
    workers: int = 1,
    seeds: list[int] | None = None,
) -> dict:
    """Train every method for every seed; returns ``{method: {seed: history}}`` plus timing and settings.

    ``workers > 1`` runs seeds in parallel, one child process per seed (``--only-seed``), each with
    ``cpus // workers`` torch threads: the tiny lab's matrices are too small for two threads to halve a
    step, so two single-threaded seeds finish ~2x sooner on 2 cores than one two-threaded process.
    Results are written after every arm (per seed under ``out/seeds/`` when parallel), and a rerun with
    the same ``--out`` resumes: arms already finished are read back, not trained again.
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    trained = [m for m in methods if m != "base"]
    if not trained:
        raise SystemExit("base is the warm start evaluated before training: add a trained method")
    seeds = list(range(size.seeds)) if seeds is None else seeds
    settings = run_settings(size, methods, assets=assets)
    previous = _read_blob(out / "histories.json")
    histories: dict[str, dict[int, list[dict]]] = {
        m: {int(s): h for s, h in previous.get("histories", {}).get(m, {}).items()} for m in methods
    }
    minutes: dict[str, float] = {m: previous.get("minutes", {}).get(m, 0.0) for m in methods}
    outcomes: dict[str, dict[int, dict]] = {
        m: {int(s): o for s, o in previous.get("outcomes", {}).get(m, {}).items()} for m in methods
    }
    if previous and previous.get("settings", {}).get("size") != asdict(size):
        raise SystemExit(
            f"{out}/histories.json holds a run of another size: pass another --out, or delete it"
        )
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:
        total = len(seeds) * len(trained)
        finished = sum(1 for m in trained for s in seeds if histories[m].get(s))
        task = bar.add_task("methods x seeds", total=total, completed=finished)
        if workers <= 1:
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

            def saved(method: str) -> None:
                save_histories(out, histories, minutes, settings, outcomes)  # a partial run can be reported
                bar.advance(task)

            for seed in seeds:
                bar.update(task, description=f"seed {seed}")
                run_seed(
                    size,
                    seed,
                    trained,
                    runs_dir=runs_dir,
                    assets=assets,
                    histories=histories,
                    minutes=minutes,
                    on_run_done=saved,
                    outcomes=outcomes,
                )
        else:
            _run_seeds_in_children(
                size, seeds, trained, out, runs_dir, assets, workers, histories, minutes, settings, bar, task,
                outcomes,
            )  # fmt: skip
    return {"histories": histories, "minutes": minutes, "settings": settings, "outcomes": outcomes}


def _run_seeds_in_children(
    size, seeds, trained, out, runs_dir, assets, workers, histories, minutes, settings, bar, task, outcomes
) -> None:
    """One ``--only-seed`` child per unfinished seed, ``workers`` at a time; merges their files."""
    import os
    import subprocess

    todo = [s for s in seeds if not all(histories[m].get(s) for m in trained)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    failed: list[str] = []

    def merge(seed: int) -> int:
        blob = _read_blob(out / "seeds" / f"seed{seed}" / "histories.json")
        for m, by in blob.get("histories", {}).items():
            if str(seed) in by:
                histories.setdefault(m, {})[seed] = by[str(seed)]
        for m, by in blob.get("outcomes", {}).items():
            if str(seed) in by:
                outcomes.setdefault(m, {})[seed] = by[str(seed)]
        return sum(1 for m in trained if histories[m].get(seed))

    while todo or running:
        while todo and len(running) < workers:
            seed = todo.pop(0)
            seed_out = out / "seeds" / f"seed{seed}"
            seed_out.mkdir(parents=True, exist_ok=True)
            log = (seed_out / "log.txt").open("a")
            args = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--only-seed",
                str(seed),
                "--size-json",
                json.dumps(asdict(size)),
                "--out",
                str(seed_out),
                "--runs-dir",
                str(runs_dir),
                "--no-progress",
                "--methods",
                *histories,  # "base" too, when asked: the child records the warm start's evaluation
            ] + (["--assets", assets] if assets else [])
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            running[seed] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        time.sleep(2.0)
        base = sum(1 for m in trained for s in seeds if histories[m].get(s) and s not in running)
        live = sum(merge(s) for s in running)
        bar.update(task, completed=base + live, description=f"seeds {sorted(running)} ({workers} workers)")
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            merge(seed)
            child = _read_blob(out / "seeds" / f"seed{seed}" / "histories.json")
            for m, v in child.get("minutes", {}).items():
                minutes[m] = minutes.get(m, 0.0) + v
            if proc.returncode != 0:
                failed.append(f"seed {seed} (exit {proc.returncode}; see {out}/seeds/seed{seed}/log.txt)")
            save_histories(out, histories, minutes, settings, outcomes)
    if failed:
        raise SystemExit("bench_methods: " + "; ".join(failed) + ". Rerun the same command to resume.")


def _read_blob(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_histories(
    out: Path,
    histories: dict[str, dict[int, list[dict]]],
    minutes: dict[str, float],
    settings: dict[str, Any],
    outcomes: dict[str, dict[int, dict]] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    blob = {
        "minutes": minutes,
        "settings": settings,
        "histories": {m: {str(s): h for s, h in by.items()} for m, by in histories.items()},
        "outcomes": {m: {str(s): o for s, o in by.items()} for m, by in (outcomes or {}).items()},
    }
    tmp = out / "histories.json.tmp"
    tmp.write_text(json.dumps(blob))
    tmp.replace(out / "histories.json")


def load_histories(out: Path, methods=None) -> dict:
    """``--report-only``: re-summarise a (possibly partial) run; methods or seeds missing are left out.

    ``methods`` restricts the report to those arms, so that a partial run can still compare the arms
    that every seed finished (the seeds kept are those all the *reported* arms finished).

    Needs no warm start and trains nothing: the run's settings (its ``BenchSize`` included) are read
    back from the file, so a ``--quick`` run is reported as the quick run it was.
    """
    path = out / "histories.json"
    if not path.is_file():
        raise SystemExit(f"--report-only: no {path}; run the benchmark first (or pass its --out)")
    blob = json.loads(path.read_text())
    histories = {
        m: {int(s): h for s, h in by.items()}
        for m, by in blob["histories"].items()
        if by and (methods is None or m in methods)
    }
    complete = set.intersection(*(set(by) for by in histories.values())) if histories else set()
    if not complete:
        raise SystemExit(f"{path} holds no seed that every method finished")
    # only seeds every method finished: all arms are then compared on the same tasks and draws
    histories = {m: {s: h for s, h in by.items() if s in complete} for m, by in histories.items()}
    outcomes = {
        m: {int(s): o for s, o in by.items() if int(s) in complete}
        for m, by in blob.get("outcomes", {}).items()
        if m in histories
    }
    return {
        "histories": histories,
        "minutes": blob["minutes"],
        "settings": blob.get("settings", {}),
        "seeds": sorted(complete),
        "outcomes": outcomes,
    }


# -- summarising ---------------------------------------------------------------------------------------


def wilson(successes: float, n: float) -> tuple[float, float]:
    from unipost.eval import wilson_interval

    return wilson_interval(round(successes), round(n))


def _finite(xs: list[float]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def _mean(xs: list[float]) -> float:
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _sd(xs: list[float]) -> float:
    xs = _finite(xs)
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def _evals(history: list[dict]) -> list[dict]:
    return [r for r in history if "eval/resolve_rate" in r]


def final_eval(history: list[dict]) -> dict:
    rec = dict(_evals(history)[-1])
    rec["train/effective_samples"] = max(
        (r.get("train/effective_samples", 0.0) for r in history), default=0.0
    )
    return rec


def summarise(histories: dict[str, dict[int, list[dict]]], size: BenchSize) -> dict[str, dict]:
    """Per method: pooled resolve rate (Wilson 95% over tasks x seeds) and seed-level secondary metrics."""
    rows = {}
    for method, by_seed in histories.items():
        finals = [final_eval(h) for _, h in sorted(by_seed.items())]
        n = sum(f["eval/n"] for f in finals)
        resolved = sum(f["eval/resolve_rate"] * f["eval/n"] for f in finals)
        submitted = sum(f["eval/submission_rate"] * f["eval/n"] for f in finals)
        lo, hi = wilson(resolved, n)
        agree = [f.get("eval/expert_agreement", math.nan) for f in finals]
        nll = [f.get("eval/expert_nll", math.nan) for f in finals]
        prefix = [f.get("eval/expert_prefix", math.nan) for f in finals]
        kl = [f.get("eval/reverse_kl", math.nan) for f in finals]
        eff = [f["train/effective_samples"] for f in finals]
        rows[method] = {
            "method": TITLES[method],
            "seeds": len(finals),
            "episodes": int(n),
            "resolved": round(resolved),
            "resolve_rate": resolved / n if n else math.nan,
            "resolve_ci_low": lo,
            "resolve_ci_high": hi,
            "submission_rate": submitted / n if n else math.nan,
            "expert_agreement_mean": _mean(agree),
            "expert_agreement_sd": _sd(agree),
            "expert_agreement_per_seed": agree,
            "expert_prefix_mean": _mean(prefix),
            "expert_nll_mean": _mean(nll),
            "expert_nll_sd": _sd(nll),
            "expert_nll_per_seed": nll,
            "reverse_kl_mean": _mean(kl),
            "reverse_kl_per_seed": kl,
            "effective_samples_per_seed": eff,
            **{f"{k.removeprefix('eval/')}_mean": _mean([f.get(k, math.nan) for f in finals]) for k in _MECH},
            "iterations_per_seed": [
                max((int(r["step"]) for r in h), default=0) for _, h in sorted(by_seed.items())
            ],
        }
    return rows


def _mechanism_means(by_seed: dict[int, list[dict]]) -> dict[str, float | None]:
    """Seed means of the final evaluations' tool-error mechanism metrics (None: never defined/recorded)."""
    means = {k: _mean([final_eval(h).get(k, math.nan) for h in by_seed.values()]) for k in _MECH}
    return {k: (v if math.isfinite(v) else None) for k, v in means.items()}


def failure_modes(histories: dict[str, dict[int, list[dict]]]) -> dict[str, dict]:
    """Table 4, pooled over seeds: mode counts re-weighted by each seed's block size."""
    from unipost.eval import NO_SUBMISSION_MODES, SUBMITTED_UNRESOLVED_MODES

    out = {}
    for method, by_seed in histories.items():
        finals = [final_eval(h) for h in by_seed.values()]
        row: dict[str, float] = {}
        for block, modes in (
            ("submitted_unresolved", SUBMITTED_UNRESOLVED_MODES),
            ("no_submission", NO_SUBMISSION_MODES),
        ):
            size = sum(f.get(f"eval/{block}", 0.0) for f in finals)
            row[block] = size
            for mode in modes:
                count = sum(f.get(f"eval/failure/{mode}", 0.0) * f.get(f"eval/{block}", 0.0) for f in finals)
                row[mode] = count / size if size else 0.0
        row["episodes"] = sum(f["eval/n"] for f in finals)
        out[method] = row
    return out


def newcombe_diff(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p1 - p2 with Newcombe's hybrid score 95% interval (from the two Wilson intervals)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


UNPAIRED_BASIS = "unpaired (Newcombe): histories.json holds no per-task outcomes for this pair"


def pooled_outcomes(outcomes: dict[str, dict[int, dict]], method: str, seeds) -> dict[str, list[bool]] | None:
    """``task id -> [resolved per seed]`` of ``method``'s final evaluations over ``seeds`` (seed order),
    the input of a paired comparison pooled over seeds; None when a seed's outcomes were not recorded.

    Each seed has its own held-out tasks here (``heldout_for``), so a task id usually carries one
    outcome; were tasks shared across seeds, a task would carry one per seed and be resampled with all
    of them (see :mod:`unipost.eval.paired`).
    """
    by_seed = outcomes.get(method) or {}
    if not seeds or any(s not in by_seed for s in seeds):
        return None
    pooled: dict[str, list[bool]] = {}
    for s in sorted(seeds):
        for task, resolved in by_seed[s]["resolved"].items():
            values = resolved if isinstance(resolved, (list, tuple)) else [resolved]
            pooled.setdefault(task, []).extend(bool(v) for v in values)
    return pooled


def paired_results(
    histories: dict[str, dict[int, list[dict]]], outcomes: dict[str, dict[int, dict]]
) -> dict[tuple[str, str], Any]:
    """Paired comparisons (A - B) of every trained arm against base and of the paper's ordering pairs,
    pooled over the seeds both arms finished; a pair without recorded outcomes is left out."""
    from unipost.eval import paired_comparison

    wanted = [(m, "base") for m in histories if m != "base"] + list(PAPER_ORDER)
    out = {}
    for a, b in dict.fromkeys(wanted):
        if a not in histories or b not in histories:
            continue
        seeds = sorted(set(histories[a]) & set(histories[b]))
        oa, ob = pooled_outcomes(outcomes, a, seeds), pooled_outcomes(outcomes, b, seeds)
        if oa is not None and ob is not None:
            out[a, b] = paired_comparison(oa, ob)
    return out


def judge_claims(
    rows: dict[str, dict],
    histories: dict[str, dict[int, list[dict]]],
    paired: dict[tuple[str, str], Any] | None = None,
) -> dict:
    """The paper's claims, judged from the numbers.

    Primary (resolve rate): A > B *holds* when the paired 95% interval of the difference (bootstrap over
    tasks, pooled over seeds; ``paired``) lies above 0, *does not hold* when it lies below 0, else
    *inconclusive*. A pair without per-task outcomes (an old histories.json) falls back to Newcombe's
    unpaired interval on the pooled counts, and says so in its ``basis``. Secondary (expert-action NLL
    on student states, lower is better): *holds* when A's NLL is lower than B's in every seed and the
    mean difference exceeds twice its seed-level standard error, *does not hold* in the mirrored case,
    else *inconclusive*.
    """
    paired = paired or {}
    pairs = []
    for a, b in PAPER_ORDER:
        if a not in rows or b not in rows:
            continue
        ra, rb = rows[a], rows[b]
        if (a, b) in paired:
            c = paired[a, b]
            d, lo, hi = c.diff, c.ci_low, c.ci_high
            extra = {"p_mcnemar": c.p_mcnemar, "gained": c.gained, "lost": c.lost, "basis": "paired"}
        else:
            d, lo, hi = newcombe_diff(ra["resolved"], ra["episodes"], rb["resolved"], rb["episodes"])
            extra = {"p_mcnemar": None, "gained": None, "lost": None, "basis": UNPAIRED_BASIS}
        primary = "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
        # secondary: expert-action NLL on student states; lower is better, so A beats B when nll_B > nll_A
        sa, sb = np.array(ra["expert_nll_per_seed"]), np.array(rb["expert_nll_per_seed"])
        diffs = sb - sa
        if len(diffs) and np.all(np.isfinite(diffs)):
            se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.inf
            mean = float(diffs.mean())
            secondary = (
                "holds"
                if np.all(diffs > 0) and mean > 2 * se
                else "does not hold"
                if np.all(diffs < 0) and -mean > 2 * se
                else "inconclusive"
            )
        else:
            mean, se, secondary = math.nan, math.nan, "inconclusive"
        pairs.append(
            {
                "claim": f"{TITLES[a]} > {TITLES[b]}",
                "resolve_diff": d,
                "resolve_diff_ci": [lo, hi],
                "resolve_verdict": primary,
                **extra,
                "nll_advantage_mean": mean,
                "nll_advantage_se": se,
                "nll_verdict": secondary,
            }
        )
    kl = {}
    for method in ("sft", "dagger"):
        if method not in histories:
            continue
        curve = mean_curve(histories[method], "eval/reverse_kl")
        if curve is None:
            continue
        ys = curve[1]
        start, low, end = float(ys[0]), float(np.min(ys)), float(ys[-1])
        tol = 0.1 * max(start, 1e-9)  # a rebound must exceed 10% of the starting KL
        kl[method] = {
            "start": start,
            "min": low,
            "end": end,
            "rebounds": end - low > tol,
            "flat_or_falling": end - low <= tol,
        }
    rebound = None
    if "sft" in kl and "dagger" in kl:
        rebound = "holds" if kl["sft"]["rebounds"] and kl["dagger"]["flat_or_falling"] else "does not hold"
    return {
        "ordering": pairs,
        "reverse_kl": kl,
        "kl_rebound_claim": {
            "claim": "SFT's reverse KL rebounds (end - min > 10% of start) while DAgger's stays flat",
            "verdict": rebound,
        },
    }


def mean_curve(by_seed: dict[int, list[dict]], key: str, points: int = 25):
    """Seed-mean of ``key`` vs effective samples, each seed linearly interpolated on a common grid."""
    curves = []
    for hist in by_seed.values():
        xs, ys, eff = [], [], 0.0
        for r in hist:
            eff = r.get("train/effective_samples", eff)
            if key in r and math.isfinite(r[key]):
                xs.append(eff)
                ys.append(r[key])
        if xs:
            curves.append((np.array(xs), np.array(ys)))
    if not curves:
        return None
    top = min(c[0][-1] for c in curves)
    if top <= 0:  # an untrained arm (base): a flat line at its value
        return np.array([0.0]), np.array([float(np.mean([c[1][0] for c in curves]))])
    grid = np.linspace(0.0, top, points)
    return grid, np.mean([np.interp(grid, x, y) for x, y in curves], axis=0)


def plot(histories: dict[str, dict[int, list[dict]]], out: Path, budget: int) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(keys: list[tuple[str, str]], name: str) -> Path:
        fig = Figure(figsize=(5.2 * len(keys), 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(keys), squeeze=False).ravel()
        for ax, (key, title) in zip(axes, keys, strict=True):
            for method, by_seed in histories.items():
                curve = mean_curve(by_seed, key)
                if curve is None:
                    continue
                xs, ys = curve
                if len(xs) == 1:
                    ax.axhline(ys[0], ls=":", color="grey", label=TITLES[method])
                else:
                    ax.plot(xs, ys, label=TITLES[method], marker="", lw=1.8)
            ax.set_xlabel("effective samples (labelled transitions trained on)")
            ax.set_title(title)
            ax.set_xlim(0, budget * 1.05)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        path = out / name
        fig.savefig(path, dpi=110)
        return path

    return {
        "learning_curves": figure(
            [
                ("eval/resolve_rate", "held-out resolve rate (primary)"),
                ("eval/expert_nll", "expert-action NLL on student states (secondary)"),
                ("eval/expert_agreement", "expert agreement on student states (secondary)"),
            ],
            "learning_curves.png",
        ),
        "reverse_kl": figure([("eval/reverse_kl", "reverse KL on student-visited states")], "reverse_kl.png"),
    }


# -- reporting -----------------------------------------------------------------------------------------

RESULT_COLUMNS = (
    ("method", "method"),
    ("resolve_rate", "resolve"),
    ("resolve_ci", "95% CI (pooled)"),
    ("submission_rate", "submitted"),
    ("expert_nll", "expert NLL* (sd)"),
    ("expert_agreement", "agreement*"),
    ("expert_prefix_mean", "prefix*"),
    ("reverse_kl_mean", "rev. KL"),
    ("effective_samples", "eff. samples"),
)


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def result_cells(row: dict) -> list[str]:
    eff = row["effective_samples_per_seed"]
    return [
        row["method"],
        f"{row['resolved']}/{row['episodes']} = {_fmt(row['resolve_rate'])}",
        f"[{_fmt(row['resolve_ci_low'])}, {_fmt(row['resolve_ci_high'])}]",
        _fmt(row["submission_rate"]),
        f"{_fmt(row['expert_nll_mean'])} ({_fmt(row['expert_nll_sd'])})",
        _fmt(row["expert_agreement_mean"]),
        _fmt(row["expert_prefix_mean"], 2),
        _fmt(row["reverse_kl_mean"]),
        "/".join(str(int(e)) for e in eff),
    ]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def machine_note(histories: dict[str, dict[int, list[dict]]]) -> str:
    """One line: how many arms ran while other jobs used the CPU (``unipost.machine.QuietMonitor``).

    A run of hours on a shared machine is rarely quiet; resolve rates do not depend on it (greedy
    evaluation), but the minutes in the table do.
    """
    from unipost.machine import header_line

    recs = [h[-1] for by in histories.values() for h in by.values() if h and "machine/busy" in h[-1]]
    if not recs:
        return f"machine: not recorded per arm (a run from before the hygiene columns); now: {header_line()}"
    others = [r["machine/others_cores"] for r in recs if r.get("machine/others_cores") is not None]
    busy = sum(bool(r["machine/busy"]) for r in recs)
    mean = f"{sum(others) / len(others):.2f}" if others else "n/a"
    return (
        f"machine: {busy} of {len(recs)} arms ran BUSY (other jobs' mean CPU use over an arm: {mean} cores; "
        f"torch threads {recs[0].get('machine/threads')})"
    )


def write_outputs(out: Path, size: BenchSize, result: dict, command: str) -> dict:
    from rich.console import Console
    from rich.table import Table

    from unipost.eval import (
        MODE_TITLES,
        NO_SUBMISSION_MODES,
        SUBMITTED_UNRESOLVED_MODES,
        mechanism_table,
        paired_table,
    )

    out.mkdir(parents=True, exist_ok=True)
    histories = result["histories"]
    rows = summarise(histories, size)
    modes = failure_modes(histories)
    paired = paired_results(histories, result.get("outcomes") or {})
    claims = judge_claims(rows, histories, paired)
    plots = plot(histories, out, size.budget)
    console = Console(width=160)

    header = [title for _, title in RESULT_COLUMNS]
    body = [result_cells(rows[m]) for m in histories]
    table = Table(title=f"Held-out resolve rate, {size.seeds} seeds x {size.heldout} tasks (greedy)")
    for h in header:
        table.add_column(h, justify="right")
    for r in body:
        table.add_row(*r)
    console.print(table)
    console.print(
        "* secondary metrics on the student's own greedy held-out states: NLL (nats/token) of the expert's "
        "next action, and the fraction of turns making exactly the expert's tool call"
    )

    mode_list = list(SUBMITTED_UNRESOLVED_MODES) + list(NO_SUBMISSION_MODES)
    mode_header = [
        "method",
        "submitted & unresolved",
        *[MODE_TITLES.get(m, m) for m in mode_list[:3]],
        "no submission",
        *[MODE_TITLES.get(m, m) for m in mode_list[3:]],
    ]
    mode_rows = []
    for m, r in modes.items():
        cells = [TITLES[m], f"{int(r['submitted_unresolved'])}/{int(r['episodes'])}"]
        cells += [f"{r[k]:.0%}" for k in mode_list[:3]]
        cells += [f"{int(r['no_submission'])}/{int(r['episodes'])}"]
        cells += [f"{r[k]:.0%}" for k in mode_list[3:]]
        mode_rows.append(cells)
    ftable = Table(title="Failure modes (Table 4 layout; each block's fractions are of that block)")
    for h in mode_header:
        ftable.add_column(h, justify="right")
    for r in mode_rows:
        ftable.add_row(*r)
    console.print(ftable)
    # the tool-error mechanism metrics of each arm, pooled as a seed mean (each seed's are rates already)
    mechanism = {TITLES[m]: _mechanism_means(by) for m, by in histories.items()}
    console.print(mechanism_table(mechanism, title="Tool errors (seed means of the final evaluations)"))

    labels = {pair: f"{TITLES[pair[0]]} - {TITLES[pair[1]]}" for pair in paired}
    if paired:
        title = f"Paired on the same held-out tasks, pooled over {size.seeds} seed(s) (A - B)"
        console.print(paired_table({labels[k]: c for k, c in paired.items()}, title=title))
    unpaired = [c["claim"] for c in claims["ordering"] if c["basis"] != "paired"]
    if unpaired:
        console.print(
            f"[bold]note[/bold]: {out / 'histories.json'} holds no per-task outcomes for "
            f"{', '.join(unpaired)} (a run from before they were recorded): those claims are judged from "
            "Newcombe's unpaired interval, which ignores that both arms saw the same tasks and is too wide; "
            "rerun the benchmark to pair them"
        )

    ctable = Table(title="The paper's ordering, judged from these numbers")
    for h in (
        "claim",
        "resolve diff [95% CI]",
        "McNemar p",
        "gained / lost",
        "verdict (primary)",
        "NLL_B - NLL_A (se)",
        "verdict (secondary)",
    ):
        ctable.add_column(h, justify="right")
    claim_rows = []
    for c in claims["ordering"]:
        lo, hi = c["resolve_diff_ci"]
        basis = "" if c["basis"] == "paired" else " unpaired"
        cells = [
            c["claim"],
            f"{_fmt(c['resolve_diff'])} [{_fmt(lo)}, {_fmt(hi)}]{basis}",
            _fmt(c["p_mcnemar"], 4) if c["p_mcnemar"] is not None else "n/a",
            f"+{c['gained']} / -{c['lost']}" if c["gained"] is not None else "n/a",
            c["resolve_verdict"],
            f"{_fmt(c['nll_advantage_mean'])} ({_fmt(c['nll_advantage_se'])})",
            c["nll_verdict"],
        ]
        claim_rows.append(cells)
        ctable.add_row(*cells)
    console.print(ctable)
    for method, k in claims["reverse_kl"].items():
        console.print(
            f"reverse KL {TITLES[method]}: start {k['start']:.3f}, min {k['min']:.3f}, end {k['end']:.3f} "
            f"(rebounds: {k['rebounds']})"
        )
    console.print(f"{claims['kl_rebound_claim']['claim']}: {claims['kl_rebound_claim']['verdict']}")

    machine = machine_note(histories)
    console.print(machine)
    meta = {
        "command": command,
        "machine": machine,
        "size": asdict(size),
        "settings": result.get("settings", {}),
        "minutes": result["minutes"],
        "plots": {k: str(v) for k, v in plots.items()},
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "methods": rows}, indent=2))
    (out / "claims.json").write_text(json.dumps(claims, indent=2))
    paired_rows = [
        [
            labels[k],
            f"{c.diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
            f"{c.p_mcnemar:.4f}",
            f"+{c.gained} / -{c.lost}",
            str(c.n),
        ]
        for k, c in paired.items()
    ]
    (out / "paired.json").write_text(
        json.dumps({labels[k]: {"a": k[0], "b": k[1], **c.to_dict()} for k, c in paired.items()}, indent=2)
    )
    (out / "paired.md").write_text(
        "Paired on the same held-out tasks, pooled over seeds: 95% bootstrap over tasks (each task's "
        "per-seed outcomes kept together), exact McNemar p on discordant pairs.\n\n"
        + markdown(["A - B", "diff [95% CI]", "McNemar p", "gained / lost", "pairs"], paired_rows)
    )
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        keys = [k for k in next(iter(rows.values())) if not isinstance(next(iter(rows.values()))[k], list)]
        writer.writerow(keys)
        for r in rows.values():
            writer.writerow([r[k] for k in keys])
    with (out / "failure_modes.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        keys = list(next(iter(modes.values())))
        writer.writerow(["method", *keys])
        for m, r in modes.items():
            writer.writerow([m, *[r[k] for k in keys]])
    (out / "results.md").write_text(
        f"`{command}`\n\n{machine}\n\n"
        + markdown(header, body)
        + "\n"
        + markdown(mode_header, mode_rows)
        + "\n"
        + markdown(
            [
                "claim",
                "resolve diff [95% CI]",
                "McNemar p",
                "gained / lost",
                "primary",
                "NLL_B - NLL_A (se)",
                "secondary",
            ],
            claim_rows,
        )
    )
    return {"rows": rows, "modes": modes, "claims": claims, "plots": plots, "paired": paired}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long budgets for the test suite")
    parser.add_argument(
        "--assets",
        default=None,
        help="warm-start directory (default: the shipped unipost/assets/tiny-lab), e.g. one built by "
        "scripts/build-warm-start.py --quick --out DIR",
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--budget", type=int, default=None, help="matched effective-sample budget per run")
    parser.add_argument("--heldout", type=int, default=None, help="held-out tasks per seed")
    parser.add_argument(
        "--keep-unsubmitted",
        action="store_true",
        help="keep trajectories without a submission for OPD / DAgger / AggreVaTe (the paper drops them)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results/methods[-quick])"
    )
    parser.add_argument(
        "--runs-dir", default=None, help="training runs (checkpoints); default runs/bench_methods"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="seeds run in parallel, one process each (2 on a 2-core machine halves the wall time)",
    )
    parser.add_argument("--only-seed", type=int, default=None, help=argparse.SUPPRESS)  # a worker
    parser.add_argument("--size-json", default=None, help=argparse.SUPPRESS)  # the parent's BenchSize
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-summarise --out/histories.json with the settings it was run with (no warm start needed)",
    )
    args = parser.parse_args(argv)
    updates: dict[str, Any] = {
        k: v for k, v in (("seeds", args.seeds), ("budget", args.budget), ("heldout", args.heldout)) if v
    }
    if args.keep_unsubmitted:
        updates["filter_unsubmitted"] = False
    size = BenchSize(**{**asdict(QUICK if args.quick else FULL), **updates})
    if args.size_json:
        size = BenchSize(**json.loads(args.size_json))
    here = Path(__file__).resolve().parent
    out = Path(args.out) if args.out else here / "results" / ("methods-quick" if args.quick else "methods")
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path("runs") / "bench_methods"
    command = "python benchmarks/bench_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    if args.report_only:
        result = load_histories(out, args.methods)
        saved = result["settings"].get("size")
        size = BenchSize(**saved) if saved else size  # the size it ran with, not this command line's
        if len(result["seeds"]) < size.seeds:
            print(f"reporting the {len(result['seeds'])} of {size.seeds} seeds that every method finished")
            size = BenchSize(**{**asdict(size), "seeds": len(result["seeds"])})
    else:
        result = run_benchmark(
            size,
            out=out,
            runs_dir=runs_dir,
            methods=args.methods,
            assets=args.assets,
            progress=not args.no_progress,
            workers=args.workers,
            seeds=None if args.only_seed is None else [args.only_seed],
        )
    if args.only_seed is not None:
        return {}  # a worker: its parent merges the seeds and writes the report
    report = write_outputs(out, size, result, command.strip())
    print(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
