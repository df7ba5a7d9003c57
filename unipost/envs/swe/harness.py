"""Evaluation through the official ``swebench`` harness: a predictions file in, its report out.

We do not re-implement grading: the harness builds (or pulls) the instance's image, applies the model
patch and the test patch, runs FAIL_TO_PASS / PASS_TO_PASS and writes
``<report_dir>/<model>.<run_id>.json`` (swebench >= 4). It needs the ``swebench`` package (``pip install
'unipost[swe]'``) and a running Docker engine; both are checked first, with a message naming what is
missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from unipost._optional import OptionalDependencyError, available
from unipost.envs.swe.instances import SWEInstance


def write_predictions(
    patches: Mapping[str, str], path: str | Path, *, model_name_or_path: str = "unipost"
) -> Path:
    """``{instance_id: model_patch}`` -> the harness's JSONL predictions file (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for instance_id, patch in patches.items():
            if not isinstance(patch, str):
                raise TypeError(f"the patch of {instance_id} must be a unified diff string, got {patch!r}")
            record = {"instance_id": instance_id, "model_name_or_path": model_name_or_path}
            record["model_patch"] = patch
            f.write(json.dumps(record) + "\n")
    return path


def write_dataset(instances: Iterable[SWEInstance], path: str | Path) -> Path:
    """The instances as a JSONL the harness loads with ``--dataset_name <path>.jsonl``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i.to_record()) + "\n" for i in instances))
    return path


def harness_command(
    dataset_path: str | Path,
    predictions_path: str | Path,
    run_id: str,
    *,
    instance_ids: list[str] | None = None,
    max_workers: int = 4,
    timeout_s: int = 1800,
    report_dir: str | Path = ".",
    python: str | None = None,
) -> list[str]:
    """The ``python -m swebench.harness.run_evaluation`` command line (its public CLI)."""
    argv = [python or sys.executable, "-m", "swebench.harness.run_evaluation"]
    argv += ["--dataset_name", str(dataset_path), "--predictions_path", str(predictions_path)]
    argv += ["--run_id", run_id, "--max_workers", str(max_workers), "--timeout", str(timeout_s)]
    argv += ["--report_dir", str(report_dir)]
    if instance_ids:
        argv += ["--instance_ids", *instance_ids]
    return argv


def evaluate_predictions(
    instances: list[SWEInstance],
    patches: Mapping[str, str],
    out_dir: str | Path,
    *,
    run_id: str = "unipost",
    model_name_or_path: str = "unipost",
    max_workers: int = 4,
    timeout_s: int = 1800,
) -> dict[str, Any]:
    """Run the harness on ``patches`` for ``instances``; returns its report (``resolved_ids``, ...)."""
    from unipost.envs.swe.docker_env import docker_client  # checks the docker package and the engine

    docker_client()
    if not available("swebench"):
        raise OptionalDependencyError(
            "'swebench' is needed for SWE-bench evaluation but is not importable. "
            "Install it with: pip install 'unipost[swe]'"
        )
    out_dir = Path(out_dir)
    dataset = write_dataset(instances, out_dir / "instances.jsonl")
    predictions = out_dir / "predictions.jsonl"
    write_predictions(patches, predictions, model_name_or_path=model_name_or_path)
    argv = harness_command(
        dataset,
        predictions,
        run_id,
        instance_ids=list(patches),
        max_workers=max_workers,
        timeout_s=timeout_s,
        report_dir=out_dir,
    )
    done = subprocess.run(argv, cwd=out_dir, capture_output=True, text=True)
    report = out_dir / f"{model_name_or_path.replace('/', '__')}.{run_id}.json"
    if done.returncode != 0 or not report.exists():
        raise RuntimeError(
            f"swebench.harness.run_evaluation failed (exit {done.returncode}); its output ends with:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return json.loads(report.read_text())
