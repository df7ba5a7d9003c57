"""Building a run's components from its config, apart from the loop that uses them.

The Trainer calls these small functions; each builds one thing (the frozen reference of a KL
regulariser, the API teacher with the rollout's sampling settings, the task pools of an environment)
so that a new model, teacher or environment needs no edit to the loop (STYLE habit 12).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from unipost.objective import Need, Recipe
from unipost.train.config import EnvConfig, TrainConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration that cannot run, with what to change."""


def build_reference(config: TrainConfig, recipe: Recipe, student: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen reference model pi_ref when ``recipe`` needs one (a KL regulariser), else None.

    ``reference.kind='initial'`` (default): a frozen copy of ``student`` as it is now, so call this
    before any update *and before a resumed run loads its checkpoint*: pi_ref is the run's initial
    policy, not the latest one. ``'checkpoint'``: a local model directory. ``'none'``: a recipe that
    needs a reference is refused here, at construction, rather than after the first rollouts.
    """
    if Need.REFERENCE_LOGPROBS not in recipe.needs:
        return None
    ref = config.reference
    if ref.kind == "none":
        raise ConfigError(
            f"{recipe.display_name} needs a frozen reference model (its KL regulariser) but "
            "reference.kind='none'; set reference.kind='initial' (a copy of the initial student) or "
            "'checkpoint' with reference.path, or drop the KL term (e.g. GRPO(kl_coef=0))"
        )
    if ref.kind == "checkpoint":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            ref.path, attn_implementation="sdpa", dtype=getattr(torch, ref.dtype)
        )
    else:
        model = copy.deepcopy(student)
    return model.eval().requires_grad_(False)


def api_teacher(config: TrainConfig) -> Any:
    """The OpenAI-compatible teacher, sampling exactly as the student's rollouts do.

    Paper App. F.1: "For all methods, including baselines, rollout collection uses temperature [..] and
    top-[p]": the teacher gets ``rollout.temperature``, ``top_p`` and ``max_new_tokens`` too (it
    used to fall back to the client's own 1.0 / 1.0 / 1024).
    """
    from unipost.rollout.openai_policy import OpenAIChatPolicy

    t, sampling = config.teacher, config.rollout.sampling()
    return OpenAIChatPolicy(
        t.base_url,  # type: ignore[arg-type]  # validated: kind='openai' has base_url and model
        t.model,  # type: ignore[arg-type]
        api_key_env=t.api_key_env,
        max_retries=t.max_retries,
        timeout_s=t.timeout_s,
        backoff_s=0.2,
        concurrency=config.rollout.concurrency,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_new_tokens,
    )


def split_size(env: EnvConfig, split: str) -> int | None:
    """Instances in ``split`` of a file-backed environment (swe), None for generated worlds."""
    if env.name != "swe":
        return None
    from unipost.envs.registry import swe_instances

    return len(swe_instances(env, split))


def task_pool(env: EnvConfig, split: str) -> list[tuple[str, int]]:
    """The ``(split, index)`` tasks of one split: ``env.train_tasks`` / ``heldout_tasks`` of them, capped
    by what a file-backed split holds (the paper's GRPO file has 293 instances, not 2,000)."""
    wanted = env.train_tasks if split == "train" else env.heldout_tasks
    available = split_size(env, split)
    if available is not None and available < wanted:
        if available == 0:
            raise ConfigError(f"env: the {split} split of the instance file is empty")
        logger.info("env.%s_tasks=%d but the %s split holds %d: using all", split, wanted, split, available)
        wanted = available
    return [(split, i) for i in range(wanted)]


def failure_judge(config: TrainConfig) -> Any:
    """The LLM judge of failure modes when ``eval.judge_model`` is set (else None: the env's rules).

    Its verdicts are cached in the run directory, so re-evaluating a run never asks twice.
    """
    e = config.eval
    if not e.judge_model:
        return None
    from unipost.eval.judge import FailureJudge

    return FailureJudge(
        e.judge_base_url,  # type: ignore[arg-type]  # validated together with judge_model
        e.judge_model,
        api_key_env=e.judge_api_key_env,
        cache_path=config.run_dir / "judge.jsonl",
    )
