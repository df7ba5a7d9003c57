"""SWE-bench Verified evaluation of a paper run (§4, Table 3 / Fig. 1): greedy student episodes in one
Docker container per instance, graded by the official ``swebench`` harness, Matplotlib excluded.

``config()`` is the run being evaluated (the paper's ``$UNIPOST_RECIPE`` run, default dagger, for
``$UNIPOST_STUDENT``); its checkpoint is read from ``config().run_dir`` unless a run directory is given.
Nothing is trained here.

On a GPU node with Docker (the engine running, ``pip install -e ".[gpu,vllm,swe]"``), once:

    python -c "import datasets; datasets.load_dataset('princeton-nlp/SWE-bench_Verified', \\
        split='test').to_json('data/swe-bench-verified.jsonl')"

then (``--subset`` a file of instance ids, one a line, e.g. the paper's fixed 100-task subset of Fig. 1;
``--limit N`` the first N; the images are pulled on first use, ~1-2 TB for all of Verified):

    UNIPOST_RECIPE=dagger python experiments/paper_eval_swebench_verified.py \\
        --instances data/swe-bench-verified.jsonl --out runs/paper/qwen3-4b-dagger/verified

or the same through the CLI: ``unipost eval-swebench RUN --instances FILE --out DIR [--limit N]``.
Writes ``DIR/swebench_verified.json`` (resolve rate with a Wilson 95% interval), the episodes
(``trajectories.jsonl``), the predictions and the harness's report and logs (``DIR/harness``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from unipost.train.config import TrainConfig
from unipost.train.paper import paper_swe_config


def config() -> TrainConfig:
    """The run this evaluates (its config.json in the run directory is what is actually loaded)."""
    return paper_swe_config(
        os.environ.get("UNIPOST_RECIPE", "dagger"), os.environ.get("UNIPOST_STUDENT", "qwen3-4b")
    )


def main(argv: list[str] | None = None) -> None:
    from unipost.envs.swe.verified import PAPER_EXCLUDED_REPOS
    from unipost.train.swe_verified import evaluate_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="run directory (default: config().run_dir)")
    parser.add_argument("--instances", type=Path, default=Path("data/swe-bench-verified.jsonl"))
    parser.add_argument("--out", type=Path, help="output directory (default: RUN/verified)")
    parser.add_argument("--subset", type=Path, help="instance ids, one a line (the paper's 100 of Fig. 1)")
    parser.add_argument("--limit", type=int, help="only the first N instances left")
    parser.add_argument("--max-workers", type=int, default=8, help="the harness's parallel containers")
    args = parser.parse_args(argv)
    run = args.run or config().run_dir
    ids = [ln.strip() for ln in args.subset.read_text().splitlines() if ln.strip()] if args.subset else None
    result = evaluate_run(
        run,
        args.instances,
        args.out or run / "verified",
        exclude_repos=PAPER_EXCLUDED_REPOS,
        instance_ids=ids,
        limit=args.limit,
        max_workers=args.max_workers,
    )
    print(result.summary())


if __name__ == "__main__":
    main()
