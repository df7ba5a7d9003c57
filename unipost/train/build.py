"""Building a run's components from its config, apart from the loop that uses them.

:func:`build_components` returns everything the Trainer's loop touches (environment factory, tools,
tokenizer, renderer, student and its rollout policy, teacher policy, white-box teacher, frozen
reference); :func:`build_engine` the rollout engine over them. Each piece is one small function and can
be injected instead of built, so a new model, teacher or environment needs no edit to the loop (STYLE
habit 12). Which scripted expert an environment has comes from the env registry
(:func:`unipost.envs.registry.make_expert`), never from here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unipost.objective import Need, Recipe
from unipost.train.config import ConfigError, EnvConfig, TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Components",
    "ConfigError",
    "api_teacher",
    "build_components",
    "build_engine",
    "build_reference",
    "build_student",
    "build_teacher_policy",
    "build_tokenizer",
    "failure_judge",
    "scripted_expert",
    "student_policy",
    "task_pool",
    "white_box_teacher",
]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Components:
    """What one run trains and rolls out with, built from its config (or injected)."""

    make_env: Callable[[Any], Any]  # task -> Environment
    tools: list[dict]  # the environment's tool schemas, rendered into every prompt
    tokenizer: Any
    renderer: Any  # ChatRenderer over tokenizer and tools: the one token counter of the run
    student: torch.nn.Module
    student_policy: Any  # TransformersPolicy on the student, or a vLLM engine fed its weights
    teacher_policy: Any | None  # acts / labels during rollouts; None when the recipe needs no live teacher
    teacher_model: torch.nn.Module | None  # white-box pi_T (OPD's log-ratio, the KL diagnostic)
    reference: torch.nn.Module | None  # frozen pi_ref of a KL regulariser


def build_components(
    config: TrainConfig,
    recipe: Recipe,
    *,
    probe_task: Callable[[], Any],
    run_dir: Path | None = None,
    is_main: bool = True,
    dist: Any = None,
    env_factory: Callable[[Any], Any] | None = None,
    student: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    teacher_policy: Any | None = None,
    teacher_model: torch.nn.Module | None = None,
    reference_model: torch.nn.Module | None = None,
) -> Components:
    """Build (or take) every component of a run; ``probe_task()`` is a task whose world is opened once
    for its tool schemas and prompt length. With several processes the main one builds shared caches
    first (``dist.main_first``)."""
    from unipost.envs.registry import make_env_factory
    from unipost.rendering.chat import ChatRenderer

    make_env = env_factory or make_env_factory(config.env)  # embedded | openhands | swe
    tools = tool_schemas(make_env, probe_task())
    with dist.main_first() if dist is not None else contextlib.nullcontext():  # caches built once
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config, run_dir)
        renderer = ChatRenderer(tokenizer, tools)
        if teacher_policy is None:
            teacher_policy = build_teacher_policy(config, recipe)
        if student is None:
            student = build_student(config, tokenizer, tools)
        if teacher_model is None:
            teacher_model = white_box_teacher(config, recipe, tokenizer, tools)
    if teacher_model is not None:
        teacher_model.eval().requires_grad_(False)
    # pi_ref is the initial student: copied before any update and before a resumed run loads weights
    reference = (
        reference_model.eval().requires_grad_(False)
        if reference_model is not None
        else build_reference(config, recipe, student)
    )
    check_context_budget(config, make_env, probe_task(), renderer)
    return Components(
        make_env=make_env,
        tools=tools,
        tokenizer=tokenizer,
        renderer=renderer,
        student=student,
        student_policy=student_policy(config, student, tokenizer, is_main=is_main),
        teacher_policy=teacher_policy,
        teacher_model=teacher_model,
        reference=reference,
    )


def build_engine(config: TrainConfig, recipe: Recipe, parts: Components, *, is_main: bool = True) -> Any:
    """The rollout engine; None when the recipe replays stored data (offline SFT collects nothing)."""
    from unipost.rollout.engine import RolloutEngine

    if not recipe.rollout.collects:
        return None
    return RolloutEngine(
        parts.make_env,
        student=parts.student_policy if recipe.rollout.uses_student else None,
        teacher=parts.teacher_policy,
        recipe=recipe,
        max_turns=config.rollout.max_turns,
        context_budget=config.rollout.context_budget,
        count_tokens=parts.renderer.count_tokens,
        concurrency=config.rollout.concurrency,
        seed=config.seed,
        progress=config.progress,
        defer_labels=None if config.rollout.defer_labels else False,
    )


# -- the environment ---------------------------------------------------------------------------------


def tool_schemas(make_env: Callable[[Any], Any], task: Any) -> list[dict]:
    """The tool schemas of ``task``'s world (opened and closed once)."""
    env = make_env(task)
    try:
        env.reset()
        return list(env.tools)
    finally:
        env.close()


def check_context_budget(
    config: TrainConfig, make_env: Callable[[Any], Any], task: Any, renderer: Any
) -> None:
    """Refuse a context budget that cannot hold the task prompt (with the tool schemas) at all."""
    env = make_env(task)
    try:
        prompt = env.reset()
    finally:
        env.close()
    n = len(renderer.context_ids(prompt))
    if n >= config.rollout.context_budget:
        raise ConfigError(
            f"rollout.context_budget={config.rollout.context_budget} is smaller than the task prompt "
            f"({n} tokens with the tool schemas); raise rollout.context_budget above {n + 256}"
        )


# -- the student ---------------------------------------------------------------------------------------


def build_tokenizer(config: TrainConfig, run_dir: Path | None = None) -> Any:
    """A pretrained student's own tokenizer, or the task BPE tokenizer (saved in ``run_dir``, where a
    resumed run finds it again)."""
    from transformers import PreTrainedTokenizerFast

    from unipost.models.tiny import load_template
    from unipost.train.setup import build_task_tokenizer

    if config.model.kind == "pretrained":  # the model's own vocabulary, with a tool template
        from unipost.models.pretrained import load_pretrained_tokenizer

        return load_pretrained_tokenizer(config.model.path)
    path = (run_dir or config.run_dir) / "tokenizer"
    if (path / "tokenizer.json").exists():  # a resumed run keeps its own tokenizer
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        tok.chat_template = load_template()
        return tok
    tok = build_task_tokenizer(
        config.model.tokenizer_vocab,
        difficulty=config.env.difficulty,
        max_observation_chars=config.env.max_observation_chars,
        cache_dir=config.cache_dir,
    )
    tok.save_pretrained(str(path))
    return tok


def tiny_clone(config: TrainConfig, which: str, tokenizer: Any, tools: list[dict]) -> torch.nn.Module:
    """The warm-started tiny student or the distilled teacher: snapshots of one cached BC run."""
    from unipost.train.setup import cached_clones

    m = config.model
    snapshots = {"student": config.warm_start.epochs, "teacher": config.teacher.distill_epochs}
    if config.teacher.white_box == "none":
        snapshots.pop("teacher")
    models = cached_clones(
        {
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads,
        },
        tokenizer,
        demos=config.warm_start.demos,
        snapshots=list(snapshots.values()),
        lr=config.warm_start.lr,
        difficulty=config.env.difficulty,
        max_observation_chars=config.env.max_observation_chars,
        tools=tools,
        cache_dir=config.cache_dir,
        seed=config.seed,
        progress=config.progress,
    )
    return models[snapshots[which]]


def build_student(config: TrainConfig, tokenizer: Any, tools: list[dict]) -> torch.nn.Module:
    """The trained model: a local pretrained directory or the tiny warm start, with LoRA if asked."""
    m = config.model
    if m.kind == "pretrained":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            m.path, attn_implementation="sdpa", dtype=getattr(torch, m.dtype)
        )
    else:
        model = tiny_clone(config, "student", tokenizer, tools)
    if m.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=m.lora_rank, lora_alpha=m.lora_alpha, target_modules=LORA_TARGETS, lora_dropout=0.0
        )
        model = get_peft_model(model, lora)
    return model


def student_policy(
    config: TrainConfig, student: torch.nn.Module, tokenizer: Any, *, is_main: bool = True
) -> Any:
    """TransformersPolicy on the trained module, or a vLLM engine fed its weights after each step."""
    from unipost.rollout.transformers_policy import TransformersPolicy

    r = config.rollout
    sampling = dict(sampling=r.sampling(), seed=config.seed)
    if r.backend == "transformers" or not is_main:  # only the main process rolls out
        return TransformersPolicy(student, tokenizer, **sampling)
    from unipost.rollout.vllm_policy import VLLMPolicy

    return VLLMPolicy(
        student,
        tokenizer,
        **sampling,
        dtype=str(next(student.parameters()).dtype).removeprefix("torch."),
        max_model_len=r.context_budget + r.max_new_tokens,
        gpu_memory_utilization=r.vllm.gpu_memory_utilization,
        tensor_parallel_size=r.vllm.tensor_parallel_size,
        kv_cache_gib=r.vllm.kv_cache_gib,
        enforce_eager=r.vllm.enforce_eager,
    )


# -- the teacher ---------------------------------------------------------------------------------------


def build_teacher_policy(config: TrainConfig, recipe: Recipe) -> Any | None:
    """The live teacher of rollouts: the environment's scripted expert or an OpenAI-compatible endpoint;
    None when the recipe needs no live teacher (e.g. GRPO, or offline SFT on stored data)."""
    needs_teacher = recipe.rollout.collects and (
        recipe.rollout.uses_teacher or Need.TEACHER_ACTIONS in recipe.needs
    )
    if config.teacher.kind == "openai":
        # OPD with an API teacher and no local white-box weights is refused here
        recipe.check_teacher(white_box=config.teacher.white_box != "none")
        if not needs_teacher:  # e.g. GRPO, or OPD scoring with the local white-box weights
            return None
        policy = api_teacher(config)  # samples with the rollout's temperature / top-p / max tokens
        policy.check()  # fail fast when the endpoint does not answer
        return policy
    if not needs_teacher:
        return None
    return scripted_expert(config.env, why=f"{recipe.display_name} needs a teacher to act or label")


def scripted_expert(env: EnvConfig, *, why: str) -> Any:
    """The environment's scripted expert (from the env registry), or a ConfigError saying it has none."""
    from unipost.envs.registry import make_expert

    expert = make_expert(env)
    if expert is None:
        raise ConfigError(
            f"{why}, but env.name={env.name!r} has no scripted expert; set teacher.kind='openai' with "
            "teacher.base_url and teacher.model (e.g. a `vllm serve` endpoint)"
        )
    return expert


def white_box_teacher(
    config: TrainConfig, recipe: Recipe, tokenizer: Any, tools: list[dict]
) -> torch.nn.Module | None:
    """The frozen white-box teacher LM when OPD's log-ratio or the KL diagnostic needs one, else None."""
    t = config.teacher
    needs_logprobs = Need.TEACHER_LOGPROBS in recipe.needs
    if needs_logprobs and t.white_box == "none":
        raise ConfigError(
            f"{recipe.display_name} needs teacher log-probs but teacher.white_box='none'; set "
            "teacher.white_box='distilled' (tiny) or 'pretrained' (a local checkpoint), or choose a "
            "recipe that needs only teacher actions"
        )
    if not (needs_logprobs or config.eval.kl_tasks > 0) or t.white_box == "none":
        return None
    if t.white_box == "pretrained":
        model = pretrained_teacher(config, tokenizer)
    else:
        model = tiny_clone(config, "teacher", tokenizer, tools)
    return model.eval().requires_grad_(False)


def pretrained_teacher(config: TrainConfig, tokenizer: Any) -> torch.nn.Module:
    """A local teacher checkpoint scoring the student's tokens: it must share the vocabulary."""
    from transformers import AutoModelForCausalLM

    t = config.teacher
    model = AutoModelForCausalLM.from_pretrained(
        t.white_box_path, attn_implementation="sdpa", dtype=getattr(torch, t.white_box_dtype)
    )
    teacher_vocab = model.get_output_embeddings().weight.shape[0]
    if teacher_vocab < len(tokenizer):
        raise ConfigError(
            f"teacher.white_box_path={t.white_box_path!r} has an output vocabulary of {teacher_vocab} "
            f"tokens but the student's tokenizer has {len(tokenizer)}: token-level log-probs need "
            "one vocabulary (same model family), or use a recipe that needs only teacher actions"
        )
    return model


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
