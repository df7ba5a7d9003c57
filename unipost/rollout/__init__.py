"""unipost.rollout: policies, the batched rollout engine, and where trajectories are kept.

    RolloutEngine(env_factory, student=..., teacher=..., recipe=...)   many episodes, batched policy calls
    Policy / AgentState / PolicyOutput                                 the protocol every policy implements
    LabelQueue, LabelFailedError                                       DAgger's API labels off the tick
    TransformersPolicy, VLLMPolicy, OpenAIChatPolicy                   local, vLLM and API policies
    SamplingConfig                                                     how a local policy samples a turn
    TrajectoryStore, to_hf_dataset / from_hf_dataset                   crash-safe JSONL; HF datasets bridge
    VLLMServer, RayEnvPool, RemoteExpert                               `vllm serve` teacher; Ray env workers

Names are imported on first use (PEP 562), so ``import unipost.rollout.engine`` does not load
transformers or vLLM.
"""

from __future__ import annotations

from unipost._optional import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["AgentState", "Policy", "PolicyOutput"], "unipost.rollout.policy"),
    **dict.fromkeys(
        ["CountTokens", "RolloutBatch", "RolloutEngine", "verify_episode"], "unipost.rollout.engine"
    ),
    "RolloutStats": "unipost.rollout.stats",
    **dict.fromkeys(["LabelFailedError", "LabelQueue"], "unipost.rollout.label_queue"),
    **dict.fromkeys(["LogprobKind", "SamplingConfig"], "unipost.rollout.sampling"),
    **dict.fromkeys(["CONTEXT_OVERFLOW", "ChatPolicyBase"], "unipost.rollout.chat_policy"),
    "TransformersPolicy": "unipost.rollout.transformers_policy",
    **dict.fromkeys(["VLLMPolicy", "hf_weights"], "unipost.rollout.vllm_policy"),
    **dict.fromkeys(
        ["OpenAIChatPolicy", "TeacherRequestError", "TeacherUnavailableError"],
        "unipost.rollout.openai_policy",
    ),
    **dict.fromkeys(["RandomToolPolicy", "ScriptedPolicy"], "unipost.rollout.scripted"),
    **dict.fromkeys(
        ["LoadResult", "StoreCorruptError", "StorePosition", "TrajectoryStore", "load"],
        "unipost.rollout.store",
    ),
    **dict.fromkeys(["from_hf_dataset", "to_hf_dataset"], "unipost.rollout.hf_dataset"),
    **dict.fromkeys(["VLLMServer", "VLLMServerError"], "unipost.rollout.vllm_server"),
    **dict.fromkeys(["RayEnvPool", "RemoteEnv", "RemoteExpert"], "unipost.rollout.ray_envs"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
