"""Execute a jupytext notebook as a real notebook and save the executed copy next to it (.ipynb).

    python notebooks/execute.py notebooks/scoring_ablation.py --budget full

Why not ``jupytext --execute``: that needs nbconvert, which the dev extra does not install; this uses
jupytext + nbclient + ipykernel only, the same path tests/test_notebooks.py runs. The working directory
is the notebook's folder unless ``--cwd`` says otherwise; figures go to ``<cwd>/figures``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def execute_notebook(
    path: str | Path,
    *,
    cwd: str | Path,
    budget: str,
    timeout_s: int = 1800,
    save_partial: str | Path | None = None,
):
    """The executed notebook (an nbformat node); raises nbclient's CellExecutionError on a failing cell.

    ``save_partial``: where to write the notebook as far as it ran when a cell fails (its outputs and
    the error), so a long run's results are not lost with the exception.
    """
    import jupytext
    from nbclient import NotebookClient

    cwd = Path(cwd).resolve()  # the kernel runs in cwd: a relative figures path would nest
    nb = jupytext.read(path)
    env = {
        **os.environ,
        "UNIPOST_NB_BUDGET": budget,
        "UNIPOST_NB_FIGURES": str(cwd / "figures"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("MPLBACKEND", None)  # ipykernel's inline backend renders the figures into the outputs
    client = NotebookClient(
        nb, kernel_name="python3", timeout=timeout_s, resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute(cwd=str(cwd), env=env)
    except Exception:
        if save_partial is not None:  # what ran (minutes of training) is kept, with the failing cell
            import jupytext

            jupytext.write(nb, save_partial)
        raise
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--budget", default="small", choices=["smoke", "small", "full"])
    parser.add_argument("--cwd", type=Path, default=None, help="working directory (default: the notebook's)")
    parser.add_argument(
        "--timeout",
        type=int,
        default=1800,
        help="seconds one cell may run (the full budget's training cell can need more on a busy machine)",
    )
    args = parser.parse_args()
    import jupytext

    started = time.perf_counter()
    out = args.notebook.with_suffix(".ipynb")
    nb = execute_notebook(
        args.notebook,
        cwd=args.cwd or args.notebook.parent,
        budget=args.budget,
        timeout_s=args.timeout,
        save_partial=out,
    )
    jupytext.write(nb, out)
    print(
        f"executed {args.notebook} at budget {args.budget} in {time.perf_counter() - started:.0f}s -> {out}"
    )


if __name__ == "__main__":
    main()
