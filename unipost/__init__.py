"""unipost: post-training long-horizon LLM agents through one objective (paper Eq. 14).

    grad L = E_{x ~ d_C} E_{y ~ d_L(.|x)} [ sg(w(x, y)) * grad(-log pi_theta(y|x)) ] + grad R

The four parts (rollout protocol -> context distribution d_C, label source d_L, score w, regulariser
R) are objects in ``unipost.objective``; every method feeds one fused packed-sequence log-likelihood
kernel in ``unipost.kernels``. The flat public API is re-exported here lazily so ``import unipost``
stays cheap and never imports an optional GPU package.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # data model
    **dict.fromkeys(["Trajectory", "Turn", "Outcome"], "unipost.data"),
    # the objective: four parts, schedules, recipes
    **dict.fromkeys(
        [
            "Recipe",
            "SFT",
            "GRPO",
            "OPD",
            "DAgger",
            "AggreVaTe",
            "get_recipe",
            "Need",
            "TeacherRollout",
            "StudentRollout",
            "TurnMixture",
            "PrefixSwitch",
            "OfflineData",
            "TeacherLabels",
            "OwnSamples",
            "Uniform",
            "SuccessFilter",
            "GroupAdvantage",
            "TeacherLogRatio",
            "Product",
            "KLToReference",
            "EntropyBonus",
            "Constant",
            "LinearDecay",
            "Cosine",
            "UniformPrefix",
            "ShiftingPrefix",
            "FixedPrefix",
        ],
        "unipost.objective",
    ),
    # the kernel
    **dict.fromkeys(
        [
            "token_logprobs",
            "token_logprobs_reference",
            "pack",
            "PackSequence",
            "Label",
            "PackedBatch",
            "packed_logprobs",
            "weighted_nll",
            "FusedLossMixin",
            "fused_causal_lm_loss",
        ],
        "unipost.kernels",
    ),
    # trajectories -> packed batch -> Eq. 14 loss
    **dict.fromkeys(["build_batch", "objective_loss", "TrainingBatch"], "unipost.batch"),
    **dict.fromkeys(["ChatRenderer", "trajectory_sequences"], "unipost.rendering.chat"),
    # environments beyond the embedded one (docs/openhands.md)
    "make_env_factory": "unipost.envs.registry",
    "OpenHandsEnv": "unipost.envs.openhands",
    **dict.fromkeys(["DockerSWEEnv", "load_instances", "evaluate_predictions"], "unipost.envs.swe"),
    # scale: data-parallel training and environment workers on Ray (docs/scaling.md)
    "Distributed": "unipost.train.distributed",
    **dict.fromkeys(["RayEnvPool", "RemoteExpert"], "unipost.rollout.ray_envs"),
    # vLLM: the student's engine (weights synced each step) and a `vllm serve` teacher
    "VLLMPolicy": "unipost.rollout.vllm_policy",
    "VLLMServer": "unipost.rollout.vllm_server",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unipost' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
