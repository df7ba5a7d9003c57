"""The README's main job: DAgger vs SFT on the embedded environment, from the same warm start.

Both runs share everything (student initialisation, tasks per iteration, budgets, optimiser, seed);
only the recipe differs, so the comparison isolates the context distribution (paper §4.3-4.4):
SFT trains on expert-visited states, DAgger on a beta-decayed turn-level mixture with the expert's
label at every visited state. Prints held-out resolve rate and reverse KL on student-visited states,
and saves learning curves to ``<out>/comparison.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unipost.train.config import (
    EnvConfig,
    EvalConfig,
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
    WarmStartConfig,
)
from unipost.train.trainer import Trainer


def main_config(out_dir: str, *, quick: bool = False, seed: int = 0) -> TrainConfig:
    """The CPU-sized configuration of the main job (``quick`` shrinks it for tests)."""
    return TrainConfig(
        name="main",
        recipe="dagger",
        iterations=1 if quick else 4,
        seed=seed,
        output_dir=out_dir,
        warm_start=WarmStartConfig(demos=4 if quick else 16, epochs=1 if quick else 2),
        teacher=TeacherConfig(distill_epochs=2 if quick else 5),
        env=EnvConfig(difficulty="easy", train_tasks=64, heldout_tasks=1 if quick else 6),
        rollout=RolloutConfig(
            episodes_per_iteration=2 if quick else 8,
            max_turns=4 if quick else 9,
            context_budget=3072,
            max_new_tokens=16 if quick else 80,
        ),
        optim=OptimConfig(lr=1e-3, epochs_per_batch=1 if quick else 2, micro_batch_tokens=4096),
        eval=EvalConfig(every=1 if quick else 2, kl_tasks=1 if quick else 3),
    )


def run_main_job(out_dir: str = "runs/main", *, quick: bool = False, seed: int = 0) -> dict:
    """Train with DAgger and with SFT, print the comparison, save the plot; returns the summary."""
    from unipost.train.plots import plot_learning_curves

    console = Console(width=140)
    base = main_config(out_dir, quick=quick, seed=seed)
    histories: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    initial = None  # both arms start from the same warm start and seed: evaluate it once
    for recipe in ("dagger", "sft"):
        cfg = base.replace(recipe=recipe, name=recipe)
        console.rule(f"{recipe}: {cfg.build_recipe().describe()}")
        start = time.perf_counter()
        histories[recipe] = Trainer(cfg).fit(initial_eval=initial)
        initial = {k: v for k, v in histories[recipe][0].items() if k != "step"}
        timings[recipe] = time.perf_counter() - start

    summary = {}
    table = Table(title="DAgger vs SFT on held-out embedded tasks (greedy)")
    for col in [
        "method",
        "resolve (start)",
        "resolve (end)",
        "95% CI",
        "submission",
        "reverse KL (start->end)",
        "effective samples",
        "minutes",
    ]:
        table.add_column(col, justify="right")
    for recipe, hist in histories.items():
        first, last = hist[0], hist[-1]
        row = {
            "resolve_start": first.get("eval/resolve_rate"),
            "resolve_end": last.get("eval/resolve_rate"),
            "resolve_ci": [last.get("eval/resolve_ci_low"), last.get("eval/resolve_ci_high")],
            "submission_end": last.get("eval/submission_rate"),
            "reverse_kl_start": first.get("eval/reverse_kl"),
            "reverse_kl_end": last.get("eval/reverse_kl"),
            "effective_samples": last.get("train/effective_samples"),
            "minutes": timings[recipe] / 60,
        }
        summary[recipe] = row
        table.add_row(
            recipe,
            _fmt(row["resolve_start"]),
            _fmt(row["resolve_end"]),
            f"[{_fmt(row['resolve_ci'][0])}, {_fmt(row['resolve_ci'][1])}]",
            _fmt(row["submission_end"]),
            f"{_fmt(row['reverse_kl_start'])} -> {_fmt(row['reverse_kl_end'])}",
            _fmt(row["effective_samples"], 0),
            f"{row['minutes']:.1f}",
        )
    console.print(table)
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


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
