"""The README's main job: DAgger vs SFT on the embedded environment, from the same warm start.

Both runs share everything (the shipped warm start, tasks per iteration, the matched budget of
effective samples, optimiser, seed); only the recipe differs, so the comparison isolates the context
distribution (paper §4.3-4.4): SFT trains on expert-visited states, DAgger on a beta-decayed turn-level
mixture with the expert's label at every visited state. Prints held-out resolve rates with Wilson 95%
intervals for the warm start and both methods, the submission rate and the reverse KL on student-visited
states, and saves learning curves to ``<out>/comparison.png``.

All three students are evaluated on the same held-out tasks, so they are compared *paired*: each method
minus the warm start and DAgger minus SFT, with the bootstrap-over-tasks 95% interval, the exact McNemar
p and the tasks gained / lost (:func:`unipost.eval.paired_comparison`; two overlapping Wilson intervals
once hid a significant regression). The tool-error mechanism metrics (first error turn, recovery,
cascades) are shown per student. Both go to ``summary.json`` too; ``unipost compare`` redoes the paired
table from the runs' saved per-task outcomes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unipost.eval import (
    EVAL_OUTCOMES_DIR,
    MECHANISM_KEYS,
    PairedComparison,
    load_eval_outcomes,
    mechanism_table,
    paired_comparison,
    paired_table,
)
from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config
from unipost.train.trainer import Trainer

# labelled transitions each method may train on (paper §4.3's matched budget): about 4 iterations
# of 16 expert episodes (~6 labelled turns each); iterations is only the upper bound
MATCHED_EFFECTIVE_SAMPLES = 320
MAIN_HELDOUT_TASKS = 100


def main_config(
    out_dir: str,
    *,
    recipe: str = "dagger",
    quick: bool = False,
    seed: int = 0,
    assets: str | None = None,
) -> TrainConfig:
    """The CPU-sized configuration of one arm of the main job (``quick`` shrinks it for tests)."""
    return tiny_config(
        out_dir,
        recipe=recipe,
        quick=quick,
        assets=assets,
        name=recipe,
        seed=seed,
        iterations=1 if quick else 6,
        max_effective_samples=None if quick else MATCHED_EFFECTIVE_SAMPLES,
        # evaluate the warm start and each method only when its budget is spent: three evaluations of
        # 100 tasks, 1-2 minutes each on 2 cores, most of the job (bench_methods draws the full curves)
        eval={"every": 1 if quick else 99},
        # 100 held-out tasks: paired differences of ~0.1 show at this size (30 hid a -0.12 regression)
        env={"heldout_tasks": 2 if quick else MAIN_HELDOUT_TASKS},
    )


def run_main_job(
    out_dir: str = "runs/main", *, quick: bool = False, seed: int = 0, assets: str | None = None
) -> dict:
    """Train with DAgger and with SFT, print the comparison, save the plot; returns the summary."""
    from unipost.train.plots import plot_learning_curves

    console = Console(width=140)
    base = main_config(out_dir, quick=quick, seed=seed, assets=assets)
    histories: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    run_dirs: dict[str, Path] = {}
    initial = None  # both arms start from the same warm start and seed: evaluate it once
    for recipe in ("dagger", "sft"):
        cfg = main_config(out_dir, recipe=recipe, quick=quick, seed=seed, assets=assets)
        console.rule(recipe)
        console.print(cfg.build_recipe().describe(), soft_wrap=True)  # whole, never cut to the width
        start = time.perf_counter()
        trainer = Trainer(cfg)
        histories[recipe] = trainer.fit(initial_eval=initial)
        run_dirs[recipe] = trainer.run_dir
        initial = {k: v for k, v in histories[recipe][0].items() if k != "step"}
        timings[recipe] = time.perf_counter() - start
    # SFT was handed DAgger's step-0 evaluation (same warm start, same seed): give it the outcomes too,
    # so each run folder holds its own warm-start evaluation for `unipost compare`
    warm_file = load_eval_outcomes(run_dirs["dagger"] / EVAL_OUTCOMES_DIR, step=0).path
    shutil.copyfile(warm_file, run_dirs["sft"] / EVAL_OUTCOMES_DIR / warm_file.name)

    summary: dict[str, dict] = {}
    first = histories["dagger"][0]
    n_heldout = base.env.heldout_tasks
    table = Table(title=f"DAgger vs SFT from one warm start: {n_heldout} held-out easy tasks, greedy")
    columns = [
        "student",
        "resolve",
        "95% CI (Wilson)",
        "submission",
        "reverse KL",
        "effective samples",
        "min",
    ]
    for col in columns:
        table.add_column(col, justify="right")
    rows = {"warm start": (first, 0.0)}
    rows.update({recipe: (hist[-1], timings[recipe]) for recipe, hist in histories.items()})
    for name, (point, seconds) in rows.items():
        row = {
            "resolve": _round(point.get("eval/resolve_rate")),
            "resolve_ci": [_round(point.get(f"eval/resolve_ci_{end}")) for end in ("low", "high")],
            "submission": _round(point.get("eval/submission_rate")),
            "reverse_kl": _round(point.get("eval/reverse_kl")),
            "effective_samples": point.get("train/effective_samples", 0) if name != "warm start" else 0,
            "minutes": _round(seconds / 60),
            "heldout_tasks": n_heldout,
            **{key: _round(point.get(f"eval/{key}")) for key in MECHANISM_KEYS},
        }
        summary[name.replace(" ", "_")] = row
        table.add_row(
            name,
            _fmt(row["resolve"]),
            f"[{_fmt(row['resolve_ci'][0])}, {_fmt(row['resolve_ci'][1])}]",
            _fmt(row["submission"]),
            _fmt(row["reverse_kl"]),
            _fmt(row["effective_samples"], 0),
            f"{row['minutes']:.1f}",
        )
    console.print(table)
    console.print(mechanism_table({name: point for name, (point, _) in rows.items()}))
    comparisons = paired_results(run_dirs)
    console.print(paired_table(comparisons, title=f"Paired on the same {n_heldout} held-out tasks (A - B)"))
    summary["paired"] = {
        label.replace(" - ", "_vs_").replace(" ", "_").lower(): c.to_dict()
        for label, c in comparisons.items()
    }
    out = Path(out_dir)
    plot = plot_learning_curves(
        {"DAgger": histories["dagger"], "SFT": histories["sft"]},
        keys=["eval/resolve_rate", "eval/reverse_kl", "train/loss"],
        out=out / "comparison.png",
        x="step",
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"learning curves: {plot}\nsummary: {out / 'summary.json'}")
    return summary


def paired_results(run_dirs: dict[str, Path]) -> dict[str, PairedComparison]:
    """Paired comparisons from the arms' saved per-task outcomes: each method's final evaluation minus
    the warm start's (step 0), and DAgger minus SFT."""
    warm = load_eval_outcomes(run_dirs["dagger"] / EVAL_OUTCOMES_DIR, step=0).task_outcomes()
    final = {r: load_eval_outcomes(d / EVAL_OUTCOMES_DIR).task_outcomes() for r, d in run_dirs.items()}
    return {
        "DAgger - warm start": paired_comparison(final["dagger"], warm),
        "SFT - warm start": paired_comparison(final["sft"], warm),
        "DAgger - SFT": paired_comparison(final["dagger"], final["sft"]),
    }


def _round(value, digits: int = 4):
    """Floats as the table shows them (a sum of fractions is 2.8e-17, not 0, before rounding)."""
    return None if value is None else round(float(value), digits) + 0.0


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
