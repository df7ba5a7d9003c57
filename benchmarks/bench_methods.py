"""The paper's method comparison at CPU scale: base, SFT, GRPO, OPD, DAgger, AggreVaTe (paper §4.3-4.4).

Every method starts from the SAME warm-started student (one cached behaviour-cloning run, copied into
each arm), sees the same seeded training-task draws and held-out tasks for a seed, uses the same
optimiser and budgets, and trains until the same matched effective-sample budget
(``TrainConfig.max_effective_samples``: labelled transitions trained on, the count the trainer logs as
``train/effective_samples``; the last batch is trimmed to the shortest prefix that reaches it). Only the
recipe differs. "base" is the warm start evaluated without training.

Outputs (printed as rich tables and written to ``--out``, default ``benchmarks/results/methods``):

* ``results.{json,csv,md}``: Table-3-style held-out resolve rate per method, pooled over seeds with a
  Wilson 95% interval on the pooled episodes (tasks x seeds), plus the secondary metrics;
* ``failure_modes.{csv,md}``: Table-4-style failure modes, pooled over seeds (each block's fractions
  are of that block, as in the paper);
* ``learning_curves.png``: held-out resolve rate and expert agreement vs effective samples (Fig. 1 left);
* ``reverse_kl.png``: reverse KL(pi_student || pi_teacher) on student-visited states vs effective samples
  (§4.4);
* ``claims.json``: the paper's ordering claims, each judged from the numbers as holds / does not hold /
  inconclusive (never hard-coded), and the reverse-KL rebound claim;
* ``histories.json``: every run's metric history (for re-plotting).

Secondary metrics (clearly secondary; resolve rate stays primary): at every greedy held-out student
state the scripted expert is asked (never executed) for its next tool call; ``expert_agreement`` is the
fraction of student turns that make exactly that call, ``expert_prefix`` the mean number of turns the
student follows the expert before its first deviation (how far into the episode it gets before
covariate shift starts).

    python benchmarks/bench_methods.py            # the recorded configuration (see benchmarks/README.md)
    python benchmarks/bench_methods.py --quick    # the test suite's smoke run (tiny budget, 2 seeds)
"""

from __future__ import annotations

import argparse
import copy
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


@dataclass(frozen=True)
class BenchSize:
    """Everything that sets the cost of the benchmark; ``QUICK`` and ``FULL`` below."""

    seeds: int
    heldout: int  # held-out tasks per seed (disjoint across seeds)
    budget: int  # matched effective-sample budget (labelled transitions) per run
    iterations: int  # upper bound on iterations (the budget normally ends a run first)
    episodes: int  # tasks per iteration
    max_turns: int
    max_new_tokens: int
    kl_tasks: int
    warm_demos: int
    warm_epochs: int
    distill_epochs: int
    grpo_group: int
    eval_every: int
    difficulty: str = "easy"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    tokenizer_vocab: int = 2048
    max_observation_chars: int = 1200
    lr: float = 1e-3
    epochs_per_batch: int = 2


QUICK = BenchSize(  # seconds per run: a 1-layer, 32-wide student; the pipeline is the real one
    seeds=2,
    heldout=1,
    budget=4,
    iterations=1,
    episodes=1,
    max_turns=4,
    max_new_tokens=12,
    kl_tasks=1,
    warm_demos=4,
    warm_epochs=2,
    distill_epochs=4,
    grpo_group=2,
    eval_every=1,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    tokenizer_vocab=1024,
    max_observation_chars=600,
    lr=1e-2,
    epochs_per_batch=1,
)
FULL = BenchSize(  # sized for < 1 h on the shared 2-core CPU; warm start / teacher = cached BC epochs 6 / 12
    seeds=3,
    heldout=3,
    budget=32,
    iterations=3,
    episodes=4,
    max_turns=7,
    max_new_tokens=64,
    kl_tasks=1,
    warm_demos=16,
    warm_epochs=6,
    distill_epochs=12,
    grpo_group=4,
    eval_every=99,  # evaluate before training and when the budget is spent (each eval costs minutes)
)


def base_config(size: BenchSize, runs_dir: str, seed: int, *, progress: bool = False):
    """The configuration every arm shares (the recipe is replaced per method)."""
    from unipost.train.config import (
        EnvConfig,
        EvalConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        TeacherConfig,
        TrainConfig,
        WarmStartConfig,
    )

    return TrainConfig(
        name=f"shared-s{seed}",
        recipe="sft",
        iterations=size.iterations,
        max_effective_samples=size.budget,
        seed=seed,
        output_dir=runs_dir,
        model=ModelConfig(
            hidden_size=size.hidden_size,
            num_layers=size.num_layers,
            num_heads=size.num_heads,
            num_kv_heads=size.num_kv_heads,
            tokenizer_vocab=size.tokenizer_vocab,
        ),
        warm_start=WarmStartConfig(demos=size.warm_demos, epochs=size.warm_epochs),
        teacher=TeacherConfig(distill_epochs=size.distill_epochs),
        env=EnvConfig(
            difficulty=size.difficulty,
            train_tasks=64,
            heldout_tasks=size.heldout,
            max_observation_chars=size.max_observation_chars,
        ),
        rollout=RolloutConfig(
            episodes_per_iteration=size.episodes,
            max_turns=size.max_turns,
            context_budget=3072,
            max_new_tokens=size.max_new_tokens,
        ),
        optim=OptimConfig(lr=size.lr, epochs_per_batch=size.epochs_per_batch, micro_batch_tokens=2048),
        eval=EvalConfig(every=size.eval_every, kl_tasks=size.kl_tasks, expert_labels=True),
        progress=progress,
    )


def recipe_for(method: str, size: BenchSize):
    """The recipe object of one arm; schedules are compressed to the benchmark's few iterations.

    Deviation from the paper, the same for every on-policy arm: ``filter_unsubmitted=False``. The paper
    drops trajectories without a submission (its 7B+ students usually submit); our tiny warm-started
    students almost never do, so the filter would discard nearly all on-policy data and turn OPD into
    "no training" and DAgger / AggreVaTe into their teacher-executed special cases.
    """
    from unipost.objective import GRPO, OPD, SFT, AggreVaTe, DAgger, LinearDecay, ShiftingPrefix

    if method == "sft":
        return SFT()  # rejection sampling: only resolved expert trajectories (all of them here)
    if method == "grpo":
        return GRPO(group_size=size.grpo_group)
    if method == "opd":
        return OPD(filter_unsubmitted=False)
    if method == "dagger":
        # DAgger()'s default (ours) beta_i = max(0.2, 1 - 0.1 i); here the same floor reached in 3 steps
        return DAgger(LinearDecay(1.0, 0.4, 0.2), filter_unsubmitted=False)
    if method == "aggrevate":
        return AggreVaTe(ShiftingPrefix(1, max(2, size.max_turns - 2), 0.5), filter_unsubmitted=False)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def heldout_for(seed: int, size: BenchSize) -> list[tuple[str, int]]:
    """Each seed evaluates on its own held-out tasks, so pooled intervals cover tasks x seeds."""
    return [("heldout", seed * size.heldout + i) for i in range(size.heldout)]


def run_benchmark(
    size: BenchSize, *, out: Path, runs_dir: Path, methods=METHODS, progress: bool = True
) -> dict:
    """Train every method for every seed; returns ``{method: {seed: history}}`` plus timing."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from unipost.train.trainer import Trainer

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    # One trainer builds what all arms share: tokenizer, warm-started student, distilled teacher (cached).
    shared = Trainer(base_config(size, str(runs_dir), 0).replace(recipe="opd", name="shared"))
    warm_state = copy.deepcopy(shared.student.state_dict())
    teacher, tokenizer = shared.teacher_model, shared.tokenizer
    histories: dict[str, dict[int, list[dict]]] = {m: {} for m in methods}
    minutes: dict[str, float] = dict.fromkeys(methods, 0.0)
    trained = [m for m in methods if m != "base"]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("methods x seeds", total=size.seeds * len(trained))
        for seed in range(size.seeds):
            initial = None  # every arm of a seed starts from the same student: evaluate it once
            for method in trained:
                bar.update(task, description=f"seed {seed}: {TITLES[method]}")
                cfg = base_config(size, str(runs_dir), seed).replace(recipe=method, name=f"{method}-s{seed}")
                student = copy.deepcopy(shared.student)
                student.load_state_dict(warm_state)
                start = time.perf_counter()
                trainer = Trainer(
                    cfg,
                    recipe=recipe_for(method, size),
                    student=student,
                    tokenizer=tokenizer,
                    teacher_model=teacher,
                    heldout_tasks=heldout_for(seed, size),
                )
                hist = trainer.fit(initial_eval=initial)
                minutes[method] += (time.perf_counter() - start) / 60
                if initial is None:
                    initial = {k: v for k, v in hist[0].items() if k != "step"}
                    if "base" in histories:
                        histories["base"][seed] = [dict(hist[0])]
                histories[method][seed] = hist
                save_histories(out, histories, minutes)  # a partial run can still be reported
                bar.advance(task)
    return {"histories": histories, "minutes": minutes}


def save_histories(out: Path, histories: dict[str, dict[int, list[dict]]], minutes: dict[str, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    blob = {
        "minutes": minutes,
        "histories": {m: {str(s): h for s, h in by.items()} for m, by in histories.items()},
    }
    tmp = out / "histories.json.tmp"
    tmp.write_text(json.dumps(blob))
    tmp.replace(out / "histories.json")


def load_histories(out: Path) -> dict:
    """``--report-only``: re-summarise a (possibly partial) run; methods or seeds missing are left out."""
    blob = json.loads((out / "histories.json").read_text())
    histories = {m: {int(s): h for s, h in by.items()} for m, by in blob["histories"].items() if by}
    complete = set.intersection(*(set(by) for by in histories.values())) if histories else set()
    if not complete:
        raise SystemExit(f"{out / 'histories.json'} holds no seed that every method finished")
    # only seeds every method finished: all arms are then compared on the same tasks and draws
    histories = {m: {s: h for s, h in by.items() if s in complete} for m, by in histories.items()}
    return {"histories": histories, "minutes": blob["minutes"], "seeds": sorted(complete)}


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
            "iterations_per_seed": [
                max((int(r["step"]) for r in h), default=0) for _, h in sorted(by_seed.items())
            ],
        }
    return rows


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


def judge_claims(rows: dict[str, dict], histories: dict[str, dict[int, list[dict]]]) -> dict:
    """The paper's claims, judged from the numbers.

    Primary (resolve rate): A > B *holds* when Newcombe's 95% interval of the pooled difference lies
    above 0, *does not hold* when it lies below 0, else *inconclusive*. Secondary (expert-action NLL on
    student states, lower is better): *holds* when A's NLL is lower than B's in every seed and the mean
    difference exceeds twice its seed-level standard error, *does not hold* in the mirrored case, else
    *inconclusive*.
    """
    pairs = []
    for a, b in PAPER_ORDER:
        if a not in rows or b not in rows:
            continue
        ra, rb = rows[a], rows[b]
        d, lo, hi = newcombe_diff(ra["resolved"], ra["episodes"], rb["resolved"], rb["episodes"])
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


def write_outputs(out: Path, size: BenchSize, result: dict, command: str) -> dict:
    from rich.console import Console
    from rich.table import Table

    from unipost.eval import MODE_TITLES, NO_SUBMISSION_MODES, SUBMITTED_UNRESOLVED_MODES

    out.mkdir(parents=True, exist_ok=True)
    histories = result["histories"]
    rows = summarise(histories, size)
    modes = failure_modes(histories)
    claims = judge_claims(rows, histories)
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

    ctable = Table(title="The paper's ordering, judged from these numbers")
    for h in (
        "claim",
        "resolve diff [95% CI]",
        "verdict (primary)",
        "NLL_B - NLL_A (se)",
        "verdict (secondary)",
    ):
        ctable.add_column(h, justify="right")
    claim_rows = []
    for c in claims["ordering"]:
        cells = [
            c["claim"],
            f"{_fmt(c['resolve_diff'])} [{_fmt(c['resolve_diff_ci'][0])}, {_fmt(c['resolve_diff_ci'][1])}]",
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

    meta = {
        "command": command,
        "size": asdict(size),
        "minutes": result["minutes"],
        "plots": {k: str(v) for k, v in plots.items()},
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "methods": rows}, indent=2))
    (out / "claims.json").write_text(json.dumps(claims, indent=2))
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
        f"`{command}`\n\n"
        + markdown(header, body)
        + "\n"
        + markdown(mode_header, mode_rows)
        + "\n"
        + markdown(
            ["claim", "resolve diff [95% CI]", "primary", "NLL_B - NLL_A (se)", "secondary"], claim_rows
        )
    )
    return {"rows": rows, "modes": modes, "claims": claims, "plots": plots}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget for the test suite")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--budget", type=int, default=None, help="matched effective-sample budget per run")
    parser.add_argument("--heldout", type=int, default=None, help="held-out tasks per seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results/methods[-quick])"
    )
    parser.add_argument(
        "--runs-dir", default=None, help="training runs (checkpoints); default runs/bench_methods"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="re-summarise --out/histories.json")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    updates = {
        k: v for k, v in (("seeds", args.seeds), ("budget", args.budget), ("heldout", args.heldout)) if v
    }
    size = BenchSize(**{**asdict(size), **updates})
    here = Path(__file__).resolve().parent
    out = Path(args.out) if args.out else here / "results" / ("methods-quick" if args.quick else "methods")
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path("runs") / "bench_methods"
    command = "python benchmarks/bench_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    if args.report_only:
        result = load_histories(out)
        if len(result["seeds"]) < size.seeds:
            print(f"reporting the {len(result['seeds'])} of {size.seeds} seeds that every method finished")
            size = BenchSize(**{**asdict(size), "seeds": len(result["seeds"])})
    else:
        result = run_benchmark(
            size, out=out, runs_dir=runs_dir, methods=args.methods, progress=not args.no_progress
        )
    report = write_outputs(out, size, result, command.strip())
    print(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
