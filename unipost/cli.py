"""The ``unipost`` command line: ``unipost env ...``, ``unipost train``, ``unipost main``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="unipost: post-training long-horizon LLM agents."
)

# Sub-apps live beside the code they drive; each is registered if its module is present.
for _module, _name in [("unipost.envs.cli", "env"), ("unipost.train.cli", "train")]:
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


@app.command()
def main() -> None:
    """The README's main job (a DAgger vs SFT run lands with the training issue)."""
    typer.echo(
        "unipost main: the DAgger-vs-SFT training job arrives with the Training issue; "
        "for now this checks the install."
    )
    doctor()


if __name__ == "__main__":
    app()
