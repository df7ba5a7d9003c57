"""unipost: post-training long-horizon LLM agents through one objective (paper Eq. 14).

    grad L = E_{x ~ d_C} E_{y ~ d_L(.|x)} [ sg(w(x, y)) * grad(-log pi_theta(y|x)) ] + grad R

The four parts (rollout protocol -> context distribution d_C, label source d_L, score w, regulariser
R) are objects in ``unipost.objective``; every method feeds one fused packed-sequence log-likelihood
kernel in ``unipost.kernels``. The names a user needs first are re-exported here, flat, and imported
on first use (PEP 562), so ``import unipost`` stays cheap and never imports torch or an optional GPU
package. README.md's "Public names" table lists them with the module each lives in; everything else
is imported from its module (e.g. ``unipost.rollout.vllm_server.VLLMServer``,
``unipost.rollout.ray_envs.RayEnvPool``).
"""

from __future__ import annotations

from unipost._optional import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # a method is a Recipe of four parts (+ schedules); the named ones are compositions of them
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
    # training: one Trainer for every recipe, configured by one TrainConfig. The ``train(config)``
    # function stays ``unipost.train.train``: here the name is the subpackage ``unipost.train``.
    **dict.fromkeys(["Trainer", "TrainConfig", "ConfigError"], "unipost.train"),
    # data and the two protocols the engine talks to
    **dict.fromkeys(["Trajectory", "Turn", "Outcome"], "unipost.data"),
    **dict.fromkeys(["Environment", "StepResult"], "unipost.envs"),
    **dict.fromkeys(["Policy", "AgentState", "PolicyOutput"], "unipost.rollout"),
    # environments
    "EmbeddedEnv": "unipost.envs.embedded",
    "make_env_factory": "unipost.envs.registry",
    "OpenHandsEnv": "unipost.envs.openhands",
    "DockerSWEEnv": "unipost.envs.swe",
    # rollouts: the engine, policies, sampling, the trajectory store and its HF datasets bridge
    **dict.fromkeys(
        [
            "RolloutEngine",
            "TransformersPolicy",
            "VLLMPolicy",
            "OpenAIChatPolicy",
            "SamplingConfig",
            "TrajectoryStore",
            "to_hf_dataset",
            "from_hf_dataset",
        ],
        "unipost.rollout",
    ),
    # evaluation
    **dict.fromkeys(
        ["evaluate_policy", "EvalResult", "collect_student_states", "reverse_kl_on_student_states"],
        "unipost.eval",
    ),
    # the kernel's entry points (DESIGN.md) and the HF / TRL adapter
    **dict.fromkeys(
        [
            "token_logprobs",
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
    "ChatRenderer": "unipost.rendering.chat",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
