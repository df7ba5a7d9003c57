"""SWE-bench Verified evaluation of a trained run: greedy episodes in Docker, graded by the harness.

:func:`evaluate_run` is the paper's evaluation protocol end to end:

1. the instances (a local JSONL export of ``princeton-nlp/SWE-bench_Verified``) minus the excluded
   repositories (the paper drops Matplotlib: its images fail to build in its Docker setup), optionally
   restricted to an id list (the paper's fixed 100-task subset of Fig. 1) and/or the first ``limit``;
2. the run's config and latest checkpoint, loaded the way ``unipost eval`` does
   (``Trainer(config, resume=True)``), with the environment switched to ``env.name='swe'`` on exactly
   those instances, all held out, and an eval-only recipe so no teacher is contacted or loaded;
3. one greedy student episode per instance (:func:`unipost.eval.evaluate_policy`, the run's own turn
   and context budgets), in-container grading off (the harness decides);
4. ``{instance_id: final git diff}`` from the trajectories (``Trajectory.task_id`` is the instance id;
   like the harness, every episode's diff counts, whether or not the agent called ``finish``),
   graded by the official ``swebench`` harness (:func:`unipost.envs.swe.harness.evaluate_predictions`);
5. the resolve rate over all selected instances (an empty patch is unresolved) with a Wilson 95%
   interval, written to ``out_dir/swebench_verified.json``.

This is ``unipost eval-swebench``. It is an application of the Trainer, so it lives in the train layer;
instance selection and the result type stay in :mod:`unipost.envs.swe.verified`.

Docker (the ``docker`` package and an engine) and ``swebench`` are checked before anything is loaded.
The run's ``config.json`` is left as it was (the Trainer rewrites it when it starts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from unipost.envs.swe.instances import ImageScheme, SWEInstance, load_instances
from unipost.envs.swe.verified import PAPER_EXCLUDED_REPOS, VerifiedResult, patches_from, select_instances
from unipost.eval.evaluate import wilson_interval

__all__ = ["eval_config", "evaluate_run", "load_for_eval", "summarise"]

logger = logging.getLogger(__name__)


def summarise(
    selected: Sequence[SWEInstance],
    patches: dict[str, str],
    report: dict[str, Any],
    *,
    agent_submission_rate: float = 0.0,
    env_errors: int = 0,
    excluded_repos: Iterable[str] = (),
    out_dir: str | Path = "",
) -> VerifiedResult:
    """Resolve rate over ALL selected instances (the harness reports only on submitted patches)."""
    if "resolved_ids" not in report:
        raise ValueError(f"the harness report has no 'resolved_ids' (keys: {sorted(report)[:10]})")
    ids = [i.instance_id for i in selected]
    resolved = sorted(set(report["resolved_ids"]) & set(ids))
    n = len(ids)
    return VerifiedResult(
        n=n,
        resolved=len(resolved),
        resolve_rate=len(resolved) / n if n else 0.0,
        resolve_ci=wilson_interval(len(resolved), n),
        resolved_ids=resolved,
        empty_patches=sum(not patches.get(i, "").strip() for i in ids),
        agent_submission_rate=agent_submission_rate,
        env_errors=env_errors,
        excluded_repos=sorted(excluded_repos),
        out_dir=str(out_dir),
        report=report,
    )


def eval_config(
    config: Any,
    run_dir: Path,
    instances_path: Path,
    split_file: Path,
    n: int,
    *,
    image_scheme: ImageScheme = "swebench",
) -> Any:
    """The run's config with the environment switched to the selected SWE instances, all held out.

    Train and held-out splits both hold the instances: the Trainer's start-up prompt-length check
    resets one training task. Grading stays with the harness (``swe_grading='none'``). The images are
    the harness's (``swebench``), whatever the run trained on (SWE-Gym's images hold SWE-Gym only).
    """
    env = {
        **config.env.model_dump(),
        "name": "swe",
        "image_scheme": image_scheme,
        "tasks_path": str(instances_path),
        "split_file": str(split_file),
        "train_tasks": n,
        "heldout_tasks": n,
        "swe_grading": "none",
    }
    data = {**config.model_dump(), "output_dir": str(run_dir.parent), "name": run_dir.name, "env": env}
    return type(config).model_validate(data)


def load_for_eval(run_dir: Path, config: Any) -> Any:
    """``Trainer(config, resume=True)`` on ``run_dir``'s latest checkpoint, with an eval-only recipe (no
    teacher endpoint contacted, no white-box teacher loaded), leaving the run's ``config.json`` as it was
    (the Trainer rewrites it with the config it was given). The student is in eval mode."""
    from unipost.objective import OwnSamples, Recipe, StudentRollout
    from unipost.train.checkpoint import CheckpointManager
    from unipost.train.trainer import Trainer

    if CheckpointManager(run_dir / "checkpoints").latest() is None:  # resume would start fresh instead
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no valid checkpoint to evaluate")
    saved = (run_dir / "config.json").read_bytes()
    try:
        trainer = Trainer(config, recipe=Recipe(StudentRollout(), OwnSamples(), name="eval"), resume=True)
    finally:
        (run_dir / "config.json").write_bytes(saved)
    trainer.student.eval()
    return trainer


def _require_docker_and_swebench() -> None:
    from unipost._optional import OptionalDependencyError, available
    from unipost.envs.swe.docker_env import docker_client

    docker_client()  # names the missing docker package or engine
    if not available("swebench"):
        raise OptionalDependencyError(
            "'swebench' is needed to grade SWE-bench Verified but is not importable. "
            "Install it with: pip install 'unipost[swe]'"
        )


def evaluate_run(
    run_dir: str | Path,
    instances_path: str | Path,
    out_dir: str | Path,
    *,
    exclude_repos: Iterable[str] = PAPER_EXCLUDED_REPOS,
    instance_ids: Sequence[str] | None = None,
    limit: int | None = None,
    max_workers: int = 4,
    timeout_s: int = 1800,
    run_id: str | None = None,
    image_scheme: ImageScheme = "swebench",
    progress: bool = True,
) -> VerifiedResult:
    """Evaluate ``run_dir``'s latest checkpoint on SWE-bench Verified (see the module docstring).

    Args:
        run_dir: a training run directory (``config.json`` + ``checkpoints/``).
        instances_path: JSONL of SWE-bench Verified instances (public format, exported once).
        out_dir: where the split, trajectories, predictions, harness logs and the summary go.
        exclude_repos: repositories left out (default: Matplotlib, as in the paper).
        instance_ids: evaluate only these (e.g. the paper's fixed 100-task subset).
        limit: evaluate only the first ``limit`` instances left.
        max_workers, timeout_s: the harness's parallelism and per-instance timeout.
        run_id: the harness run id (default: ``<run name>-verified``).
        image_scheme: the episodes' per-instance images (default: the harness's ``swebench`` images).
        progress: show the rollout progress bar.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a unipost run directory")
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run_dir} holds no checkpoints/ folder: nothing trained to evaluate")
    instances_path = Path(instances_path).resolve()
    exclude_repos = tuple(exclude_repos)
    selected = select_instances(
        load_instances(instances_path), exclude_repos=exclude_repos, instance_ids=instance_ids, limit=limit
    )
    _require_docker_and_swebench()

    from unipost.envs.swe.harness import evaluate_predictions
    from unipost.train.config import TrainConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [i.instance_id for i in selected]
    split_file = out_dir / "split.json"
    split_file.write_text(json.dumps({"train": ids, "heldout": ids}, indent=1))
    run_config = TrainConfig.from_file(run_dir / "config.json")
    config = eval_config(run_config, run_dir, instances_path, split_file, len(ids), image_scheme=image_scheme)
    trainer = load_for_eval(run_dir, config)
    result = trainer.evaluate_heldout(progress=progress, iteration=trainer.start_iteration)
    with (out_dir / "trajectories.jsonl").open("w") as f:
        for t in result.trajectories:
            f.write(t.model_dump_json() + "\n")
    patches = patches_from(result.trajectories)
    missing = [i for i in ids if i not in patches]
    if missing:  # its environment could not even be built: unresolved, like an empty patch
        logger.warning("no episode for %d instance(s), e.g. %s: empty patches", len(missing), missing[:3])
    report = evaluate_predictions(
        selected,
        {i: patches.get(i, "") for i in ids},
        out_dir / "harness",
        run_id=run_id or f"{config.name}-verified",
        model_name_or_path=config.name,
        max_workers=max_workers,
        timeout_s=timeout_s,
    )
    verdict = summarise(
        selected,
        patches,
        report,
        agent_submission_rate=result.submission_rate,
        env_errors=result.env_errors,
        excluded_repos=exclude_repos,
        out_dir=out_dir,
    )
    (out_dir / "swebench_verified.json").write_text(json.dumps(asdict(verdict), indent=1, default=str))
    return verdict
