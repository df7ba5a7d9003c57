"""SWE-bench Verified selection and bookkeeping: which instances, which patch each episode left, the result.

The pieces here need no trained model: :func:`select_instances` (the paper's exclusions and subsets),
:func:`patches_from` (an episode's final diff) and :class:`VerifiedResult`. Running a trained run on the
instances (``evaluate_run``) is an application of the Trainer and lives above it, in
:mod:`unipost.train.swe_verified`; the environments layer does not import training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from unipost.data import Trajectory
from unipost.envs.swe.instances import SWEInstance

PAPER_EXCLUDED_REPOS: tuple[str, ...] = ("matplotlib/matplotlib",)


def select_instances(
    instances: Sequence[SWEInstance],
    *,
    exclude_repos: Iterable[str] = PAPER_EXCLUDED_REPOS,
    instance_ids: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[SWEInstance]:
    """The instances to evaluate, in file order: excluded repos dropped, then ``instance_ids`` (all of
    which must exist and not be excluded), then the first ``limit``."""
    if isinstance(exclude_repos, str):
        raise TypeError("exclude_repos is a collection of 'owner/name' strings, not one string")
    excluded = set(exclude_repos)
    kept = [i for i in instances if i.repo not in excluded]
    if instance_ids is not None:
        wanted = list(dict.fromkeys(instance_ids))
        known = {i.instance_id: i for i in instances}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise ValueError(f"{len(unknown)} instance id(s) not in the instances file, e.g. {unknown[:3]}")
        dropped = [i for i in wanted if known[i].repo in excluded]
        if dropped:
            raise ValueError(f"instance id(s) {dropped[:3]} belong to excluded repos {sorted(excluded)}")
        chosen = set(wanted)
        kept = [i for i in kept if i.instance_id in chosen]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of instances, got {limit}")
        kept = kept[:limit]
    if not kept:
        raise ValueError("no instances left to evaluate after exclusions / id list / limit")
    return kept


def patches_from(trajectories: Iterable[Trajectory]) -> dict[str, str]:
    """``{instance_id: patch}`` from finished SWE episodes.

    ``Outcome.detail`` is DockerSWEEnv's ``git diff``; the rollout engine prefixes it with
    ``environment error (<meta.env_error>); `` when a step failed, which is stripped here. An episode
    whose container failed before a diff was taken (anything that is not a diff) gets the empty patch,
    which the harness counts as unresolved.
    """
    patches: dict[str, str] = {}
    for t in trajectories:
        detail = t.outcome.detail
        error = t.meta.get("env_error")
        if error:
            detail = detail.removeprefix(f"environment error ({error}); ")
        patches[t.task_id] = detail if detail.startswith("diff --git") else ""
    return patches


@dataclass
class VerifiedResult:
    """The harness's verdict over the selected instances, with the student's own episode statistics."""

    n: int
    resolved: int
    resolve_rate: float
    resolve_ci: tuple[float, float]  # Wilson 95%
    resolved_ids: list[str]
    empty_patches: int
    agent_submission_rate: float
    env_errors: int
    excluded_repos: list[str]
    out_dir: str
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        lo, hi = self.resolve_ci
        return (
            f"SWE-bench Verified: resolved {self.resolved}/{self.n} = {self.resolve_rate:.1%} "
            f"[{lo:.1%}, {hi:.1%}] (Wilson 95%), empty patches {self.empty_patches}, "
            f"agent submitted {self.agent_submission_rate:.1%}, environment errors {self.env_errors}"
        )
