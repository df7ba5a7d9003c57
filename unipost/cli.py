"""The ``unipost`` command line: ``unipost env ...``, ``unipost train``, ``unipost eval``,
``unipost eval-swebench``, ``unipost main``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="unipost: post-training long-horizon LLM agents."
)

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
    """Say which optional pieces (GPU kernels, vLLM, OpenHands, bubblewrap) are available."""
    import shutil

    from unipost._optional import report

    for name, ok in report().items():
        typer.echo(f"{name:14s} {'yes' if ok else 'no'}")
    typer.echo(f"{'bwrap':14s} {'yes' if shutil.which('bwrap') else 'no'}")


def _load_experiment(path: Path):
    """An experiment is a .py file defining ``config()`` (and optionally ``recipe()``), or a JSON config."""
    from unipost.train.config import TrainConfig

    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist")
    if path.suffix == ".json":
        return TrainConfig.from_file(path), None
    spec = importlib.util.spec_from_file_location(f"unipost_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise typer.BadParameter(f"{path} defines no config() function returning a TrainConfig")
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
    from unipost.train.config import TrainConfig
    from unipost.train.trainer import Trainer

    config = TrainConfig.from_file(run / "config.json")
    config = config.model_validate(
        {**config.model_dump(), "output_dir": str(run.parent), "name": run.name}
        | ({"env": {**config.env.model_dump(), "heldout_tasks": tasks}} if tasks else {})
    )
    trainer = Trainer(config, resume=True)
    metrics = trainer.evaluate(trainer.start_iteration)
    for key, value in sorted(metrics.items()):
        typer.echo(f"{key:40s} {value:.4f}")


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
