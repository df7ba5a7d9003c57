"""The ``unipost`` command line: ``unipost env ...``, ``unipost train``, ``unipost eval``,
``unipost compare``, ``unipost eval-swebench``, ``unipost main``, ``unipost doctor``.

A user's mistake (a path that is not a run, a misspelt config field, a missing optional package) is
reported in one or two lines naming the problem and the fix; the traceback is shown only with
``unipost --debug ...``. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import typer

_DEBUG = {"on": False}


class UserError(Exception):
    """A mistake in what the user asked for; the message says what is wrong and what to do instead."""


def user_error_message(exc: BaseException) -> str | None:
    """One or two lines for a user's mistake, or None for anything that should keep its traceback."""
    from pydantic import ValidationError

    from unipost._optional import OptionalDependencyError
    from unipost.train.build import ConfigError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"config error{f' in {where}' if where else ''}: {message}{more}"
    if isinstance(exc, (UserError, ConfigError, OptionalDependencyError, FileNotFoundError)):
        return str(exc)
    return None


class _App(typer.Typer):
    """The Typer app, printing a user's mistake in one or two lines (``--debug``: the traceback)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit:
            raise
        except Exception as exc:
            message = user_error_message(exc)
            if message is None or _DEBUG["on"]:
                raise
            typer.echo(f"error: {message}", err=True)
            typer.echo("(run with --debug for the traceback)", err=True)
            raise SystemExit(2) from None


app = _App(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="unipost: post-training long-horizon LLM agents.",
)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error"),
) -> None:
    _DEBUG["on"] = debug


# Sub-apps live beside the code they drive; each is registered if its module is present.
for _module, _name in [("unipost.envs.cli", "env")]:
    try:
        _sub = importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # the sub-package has not landed yet
        if exc.name and exc.name.startswith("unipost"):
            continue
        raise
    app.add_typer(_sub.app, name=_name)


@app.command()
def doctor() -> None:
    """Say what this machine can run: torch and CUDA, each optional backend and what it needs."""
    from unipost._optional import doctor_lines

    for line in doctor_lines():
        typer.echo(line)


def _load_experiment(path: Path):
    """An experiment is a .py file defining ``config()`` (and optionally ``recipe()``), or a JSON config."""
    from unipost.train.config import TrainConfig

    if not path.is_file():
        raise UserError(
            f"{path} is not a file; give an experiment file (e.g. experiments/cpu_dagger.py, which defines "
            "config()) or a run's config.json"
        )
    if path.suffix == ".json":
        return TrainConfig.from_file(path), None
    spec = importlib.util.spec_from_file_location(f"unipost_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise UserError(f"{path} defines no config() function returning a TrainConfig; add one")
    recipe = module.recipe() if hasattr(module, "recipe") else None
    return module.config(), recipe


@app.command()
def train(
    experiment: Path = typer.Argument(..., help="experiments/<name>.py (defines config()) or a JSON config"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run's latest valid checkpoint"),
    output_dir: str | None = typer.Option(None, help="override config.output_dir"),
    iterations: int | None = typer.Option(None, help="override config.iterations"),
) -> None:
    """Train with an experiment's recipe: collect -> label -> score -> optimise -> evaluate -> checkpoint."""
    from unipost.train.trainer import Trainer

    config, recipe = _load_experiment(experiment)
    updates = {k: v for k, v in {"output_dir": output_dir, "iterations": iterations}.items() if v is not None}
    if updates:
        config = config.model_validate({**config.model_dump(), **updates})
    Trainer(config, recipe=recipe, resume=resume).fit()


@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="a run directory (holds config.json and checkpoints/)"),
    tasks: int | None = typer.Option(None, help="number of held-out tasks (default: the run's)"),
) -> None:
    """Greedy held-out evaluation of a run's latest checkpoint: resolve rate, failure modes, reverse KL."""
    from unipost.train.checkpoint import CheckpointManager
    from unipost.train.config import TrainConfig
    from unipost.train.trainer import Trainer

    if not (run / "config.json").is_file():
        raise UserError(
            f"{run} is not a unipost run (no config.json); give the folder a training run wrote, e.g. "
            "runs/<name> after `unipost train experiments/cpu_dagger.py`"
        )
    if CheckpointManager(run / "checkpoints").latest() is None:
        raise UserError(f"{run} holds no valid checkpoint to evaluate; train it first (unipost train ...)")
    config = TrainConfig.from_file(run / "config.json")
    config = config.model_validate(
        {**config.model_dump(), "output_dir": str(run.parent), "name": run.name}
        | ({"env": {**config.env.model_dump(), "heldout_tasks": tasks}} if tasks else {})
    )
    trainer = Trainer(config, resume=True)
    metrics = trainer.evaluate(trainer.start_iteration)
    for key, value in sorted(metrics.items()):
        typer.echo(f"{key:40s} {value:.4f}")


def _saved_eval(spec: str, step: int | None):
    """``RUN`` or ``RUN@STEP`` -> that run's saved held-out evaluation (default: its latest)."""
    from unipost.eval import EVAL_OUTCOMES_DIR, load_eval_outcomes

    path, at, suffix = spec.rpartition("@")
    if at and suffix.isdigit():
        run, step = Path(path), int(suffix)
    else:
        run = Path(spec)
    if not run.is_dir():
        raise UserError(f"{run} is not a directory; give a run folder (runs/<name>), optionally RUN@STEP")
    return load_eval_outcomes(run / EVAL_OUTCOMES_DIR, step)


def _arm_evals(spec: str, step: int | None) -> list:
    """``RUN[@STEP][,RUN[@STEP]...]`` -> the saved evaluations of one arm, one per seed, in the order given.

    Why commas: a method's result must not hinge on one seed, and pooling seeds keeps every task paired
    (seed k of one arm with seed k of another, as :func:`unipost.eval.paired_comparison` requires), where
    averaging per-seed intervals would not.
    """
    parts = spec.split(",")
    if any(not part.strip() for part in parts):
        raise UserError(f"{spec!r} has an empty entry; separate one arm's seeds by single commas: RUN,RUN")
    return [_saved_eval(part.strip(), step) for part in parts]


def _run_seed(ev) -> int | None:
    """The training seed recorded in the run folder's config.json (None when it records none)."""
    config = ev.path.parent.parent / "config.json"
    try:
        seed = json.loads(config.read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) else None


def _check_pooling(saved: dict) -> None:
    """Refuse pooled arms that would not pair: one evaluation used twice (it would count its tasks twice
    and shrink the McNemar p), or seeds in a different order than the reference's."""
    seen: dict = {}
    for spec, evals in saved.items():
        for ev in evals:
            if ev.path in seen and (seen[ev.path] != spec or len(evals) > 1):
                raise UserError(
                    f"{ev.path} is used twice ({seen[ev.path]} and {spec}): each evaluation counts once"
                )
            seen[ev.path] = spec
    reference, *others = saved
    ref_seeds = [_run_seed(ev) for ev in saved[reference]]
    for spec in others:
        seeds = [_run_seed(ev) for ev in saved[spec]]
        known = all(s is not None for s in (*seeds, *ref_seeds))
        if known and len(seeds) == len(ref_seeds) and seeds != ref_seeds:
            raise UserError(
                f"the seeds of {spec} ({seeds}) are not in the reference's order ({ref_seeds}): "
                "list each arm's runs in the same seed order, so seed k pairs with seed k"
            )


def _arm_label(spec: str) -> str:
    """A short name for an arm: its folder name (with @STEP), and how many seeds it pools."""
    names = [Path(part.strip()).name for part in spec.split(",")]
    if len(names) == 1:
        return names[0]
    return f"{names[0]} ({len(names)} seeds)" if len(set(names)) == 1 else ",".join(names)


def _pooled_outcomes(evals: list) -> dict:
    """``task id -> (resolved per seed...)`` over one arm's evaluations (a bare bool for one seed)."""
    from unipost.eval import outcomes_by_task

    return outcomes_by_task([episode for ev in evals for episode in ev.episodes])


def _pooled_mechanism(evals: list) -> dict:
    """The tool-error mechanism metrics over every episode of one arm's evaluations (all seeds)."""
    import dataclasses

    return dataclasses.replace(evals[0], episodes=[e for ev in evals for e in ev.episodes]).mechanism()


@app.command()
def compare(
    runs: list[str] = typer.Argument(
        ...,
        help="two or more arms, each RUN or RUN@STEP (default: its latest held-out evaluation), or one run "
        "per seed joined by commas (RUN_S0,RUN_S1,...) to pool seeds with tasks kept paired",
    ),
    step: int | None = typer.Option(None, help="evaluation step of every run given without @STEP"),
    plot: Path = typer.Option(Path("compare.png"), help="where the paired forest plot is saved"),
    resamples: int = typer.Option(10_000, help="bootstrap resamples of the task set"),
) -> None:
    """Paired comparison of runs on the same held-out tasks: each arm minus the FIRST (the reference).

    Prints each arm's resolve rate and tool-error mechanism metrics, then per arm the paired difference
    with its 95% interval (bootstrap over tasks), exact McNemar p and tasks gained / lost, and saves a
    forest plot. E.g. ``unipost compare runs/main/dagger@0 runs/main/dagger runs/main/sft`` (the warm
    start is the step-0 evaluation of either arm). An arm may pool seeds, one run per seed joined by
    commas, seed k of every arm paired with seed k of the reference: ``unipost compare
    runs/main/dagger@0,runs/main-s1/dagger@0 runs/main/dagger,runs/main-s1/dagger``. The interval then
    resamples tasks with their seeds kept together. Runs evaluated on different task sets, or arms with
    different numbers of seeds, are refused.
    """
    from rich.console import Console
    from rich.table import Table

    from unipost.eval import (
        TaskSetMismatchError,
        mechanism_table,
        paired_comparison,
        paired_table,
        plot_paired,
    )

    if len(runs) < 2:
        raise UserError(
            "compare needs at least two runs: the reference first, then the runs to compare with it"
        )
    if len(set(runs)) < len(runs):
        raise UserError(
            f"a run is named twice in {runs}; name each evaluation once (RUN@STEP for another step)"
        )
    saved = {spec: _arm_evals(spec, step) for spec in runs}
    _check_pooling(saved)
    short = [_arm_label(spec) for spec in runs]
    label = dict(zip(runs, short if len(set(short)) == len(short) else runs, strict=True))
    console = Console(width=160)
    table = Table(title="Held-out evaluations compared")
    for column in ("run", "seeds", "step", "resolved", "resolve", "file"):
        table.add_column(column, justify="left" if column in ("run", "file") else "right")
    for spec, evals in saved.items():
        outcomes = [r["resolved"] for ev in evals for r in ev.episodes]
        table.add_row(
            spec,
            str(len(evals)),
            ",".join(str(ev.step) for ev in evals),
            f"{sum(outcomes)}/{len(outcomes)}",
            f"{sum(outcomes) / max(1, len(outcomes)):.3f}",
            "\n".join(str(ev.path) for ev in evals),
        )
    console.print(table)
    mechanism = {label[spec]: _pooled_mechanism(evals) for spec, evals in saved.items()}
    console.print(mechanism_table(mechanism))
    reference, *others = runs
    comparisons = {}
    for spec in others:
        try:
            comparisons[f"{label[spec]} - {label[reference]}"] = paired_comparison(
                _pooled_outcomes(saved[spec]), _pooled_outcomes(saved[reference]), resamples=resamples
            )
        except TaskSetMismatchError as exc:
            raise UserError(f"cannot pair {spec} with {reference}: {exc}") from None
    console.print(paired_table(comparisons))
    for spec, c in zip(others, comparisons.values(), strict=True):
        console.print(c.summary(label[spec], label[reference]))
    console.print(f"plot: {plot_paired(comparisons, plot)}")


@app.command("eval-swebench")
def eval_swebench(
    run: Path = typer.Argument(..., help="a run directory (holds config.json and checkpoints/)"),
    instances: Path = typer.Option(..., help="JSONL of SWE-bench Verified instances (public format)"),
    out: Path = typer.Option(..., help="where predictions, harness logs and swebench_verified.json go"),
    limit: int | None = typer.Option(None, help="evaluate only the first N instances left"),
    ids: Path | None = typer.Option(None, help="a file of instance ids, one a line (e.g. a fixed subset)"),
    exclude_repo: list[str] = typer.Option(
        ["matplotlib/matplotlib"],
        help="repos to leave out (repeatable; the paper drops Matplotlib; '' keeps all)",
    ),
    max_workers: int = typer.Option(4, help="the swebench harness's parallel containers"),
) -> None:
    """SWE-bench Verified of a run's latest checkpoint: greedy episodes in Docker, the swebench harness."""
    from unipost.train.swe_verified import evaluate_run

    wanted = [ln.strip() for ln in ids.read_text().splitlines() if ln.strip()] if ids else None
    result = evaluate_run(
        run,
        instances,
        out,
        exclude_repos=exclude_repo,
        instance_ids=wanted,
        limit=limit,
        max_workers=max_workers,
    )
    typer.echo(result.summary())


@app.command()
def main(
    out_dir: str = typer.Option("runs/main", help="where both runs, the plot and summary.json go"),
    quick: bool = typer.Option(False, help="a seconds-long smoke version (tests)"),
    seed: int = typer.Option(0),
) -> None:
    """The README's main job: DAgger vs SFT on the embedded environment, with a comparison and a plot."""
    from unipost.train.main_job import run_main_job

    run_main_job(out_dir, quick=quick, seed=seed)


if __name__ == "__main__":
    app()
