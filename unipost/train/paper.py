"""The paper's own setup (§4.1, Appendix F) as one typed config builder for GPU clusters.

The experiment files ``experiments/paper_*.py`` call :func:`paper_swe_config`. Every value it uses is
an entry of :data:`PROVENANCE` with its source:

* **paper**: the seed text (``shared/paper``) states it; the entry carries the verbatim quote.
* **ours**: the extracted text lost the number (most of Appendix F's numbers did not survive) or never
  gives one; the entry says why we chose this value. Change it here when the paper's value is known.

``experiments/README.md`` shows the same table and ``tests/test_provenance.py`` keeps the two in sync
(and checks every quote against the paper text), so a value cannot be called "paper" without a quote.

Paths come from the environment so one file runs on any cluster, and nothing is fetched from a hub:

    UNIPOST_MODELS_DIR   local directory holding the model folders (default /models)
    UNIPOST_TEACHER_URL  OpenAI-compatible endpoint of the teacher (default http://localhost:8000/v1)
    UNIPOST_SWE_GYM      SWE-Gym instances, SWE-bench JSONL format (default data/swe-gym.jsonl)
    UNIPOST_SWE_SPLIT    optional JSON {"train": [...], "heldout": [...]} fixing SWE-Gym Holdout
    UNIPOST_SKYRL_V0     the 293 SkyRL-v0 instances GRPO trains on (default data/skyrl-v0.jsonl)
    UNIPOST_SFT_DATA     SFT's stored teacher trajectories (default runs/paper/teacher-rollouts.jsonl;
                         written by :func:`collect_sft_dataset`)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unipost.train.config import (
    EnvConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
    VLLMEngineConfig,
    WarmStartConfig,
)


@dataclass(frozen=True)
class Sourced:
    """A setting of the paper's runs and where its value comes from."""

    value: Any
    source: Literal["paper", "ours"]
    note: str  # paper: a verbatim quote of the seed text; ours: why this value


def _paper(value: Any, quote: str) -> Sourced:
    return Sourced(value, "paper", quote)


def _ours(value: Any, why: str) -> Sourced:
    return Sourced(value, "ours", why)


PROVENANCE: dict[str, Sourced] = {
    "students": _paper(
        "Qwen3-4B-Instruct-2507, Qwen3-8B",
        "We instantiate the student policy with two model scales from the Qwen3 family [39]: "
        "Qwen3-4B-Instruct-2507 and Qwen3-8B.",
    ),
    "teacher": _paper(
        "Qwen3-Coder-30B-A3B-Instruct",
        "we use Qwen3-Coder-30B-A3B-Instruct [5] as the fixed teacher policy",
    ),
    "rollout temperature": _ours(
        1.0,
        "number lost ('rollout collection uses temperature and top-'); 1.0 makes GRPO and OPD sample the "
        "policy they differentiate; shared by student and teacher as the paper says",
    ),
    "rollout top_p": _ours(1.0, "number lost; 1.0, untruncated, for the same reason"),
    "evaluation decoding": _paper("greedy", "while evaluation uses greedy decoding"),
    "context tokens": _ours(
        32_768, "number lost ('a maximum context length of K tokens'); 32k, the usual SWE-agent budget"
    ),
    "max turns": _ours(
        50, "number lost ('allow at most environment interactions per trajectory'); SWE-Gym / SkyRL's 50"
    ),
    "max new tokens per turn": _ours(4_096, "not given; one reasoning + tool-call turn"),
    "fresh batch per iteration": _paper(
        True, "At each training iteration, we collect a fresh mixed-policy rollout batch"
    ),
    "online tasks per iteration": _ours(
        64, "number lost ('we collect a fresh mixed-policy rollout batch of task instances')"
    ),
    "online iterations": _ours(
        10,
        "number lost ('We train for rollout-update iterations'); with the beta schedule below it "
        "reaches its floor at iteration 8",
    ),
    "dagger beta schedule": _ours(
        "max(0.2, 1.0 - 0.1 i)",
        "the shape is the paper's ('linearly decay it by per iteration until reaching a floor of'), the "
        "start 1.0, step 0.1 and floor 0.2 are ours: the numbers were lost",
    ),
    "aggrevate prefix law": _ours(
        "k in 1..16, tilt +0.5 per iteration",
        "support and shift lost; the paper says only 'shifting probability mass toward longer student "
        "prefixes over training' and that student rollouts end within about [lost] turns",
    ),
    "online filter": _paper(
        "drop unsubmitted",
        "We filter out trajectories that do not produce a valid final patch submission.",
    ),
    "online lr schedule": _paper("constant", "We use a constant learning rate of"),
    "online lr": _ours(1e-5, "number lost; a common full-fine-tuning LR for 4-8B students"),
    "online epochs per batch": _ours(
        2, "number lost ('train for epochs over each collected online batch'); 2 passes"
    ),
    "sft data": _paper(
        "teacher rollouts of all training tasks, rejection-sampled",
        "We first use the teacher model to generate trajectories for all SWE-Gym training tasks, and then "
        "apply rejection sampling to retain only trajectories whose final patches pass the executable tests.",
    ),
    "sft lr schedule": _paper("cosine", "using a cosine learning-rate schedule with maximum learning rate"),
    "sft max lr": _ours(2e-5, "number lost; SWE-Gym-style full fine-tuning of a 4-8B student"),
    "sft min lr ratio": _ours(0.1, "number lost ('minimum learning rate'); 10% of the maximum"),
    "sft warmup ratio": _ours(0.1, "number lost ('and warmup ratio'); 10% of the optimiser steps"),
    "sft epochs": _ours(3, "number lost ('We train the student for epochs on this filtered dataset')"),
    "grpo instances": _paper(293, "GRPO because it is trained on the 293-instance SkyRL-v0 subset"),
    "grpo lr schedule": _paper("constant", "We use a constant learning rate of"),
    "grpo lr": _ours(1e-6, "number lost; a usual GRPO LR for 4-8B students (10x below supervised)"),
    "grpo group size": _ours(8, "number lost ('For each task, we sample trajectories'); 8"),
    "grpo tasks per iteration": _ours(16, "number lost ('an online batch size of'); 16 tasks x 8 samples"),
    "grpo passes": _ours(
        2, "number lost ('over the SkyRL-v0 subset for full passes'); iterations = ceil(passes x 293 / 16)"
    ),
    "heldout tasks": _ours(
        100, "not stated ('a fixed set of SWE-Gym instances'); Table 3's holdout rates are whole percents"
    ),
    "heldout for grpo": _paper(
        "SWE-Gym Holdout", "For in-domain evaluation, we reserve a fixed set of SWE-Gym instances as"
    ),
    "verified subset": _paper(100, "a fixed 100-task SWE-Bench Verified subset"),
    "grad accumulation": _ours(8, "not given; a multiple of 8 GPUs (unipost.train.distributed)"),
}
"""Every setting of the paper's runs with its source; experiments/README.md renders the same table."""


def value(key: str) -> Any:
    """``PROVENANCE[key].value``: what the configs below read."""
    return PROVENANCE[key].value


# paper §4.1: the two students and the fixed teacher (folder names as the hub publishes them)
STUDENTS = {"qwen3-4b": "Qwen3-4B-Instruct-2507", "qwen3-8b": "Qwen3-8B"}
TEACHER = value("teacher")
TEMPERATURE = value("rollout temperature")
TOP_P = value("rollout top_p")
CONTEXT_TOKENS = value("context tokens")
MAX_TURNS = value("max turns")
EPISODES_PER_ITERATION = value("online tasks per iteration")
ITERATIONS = value("online iterations")

Recipe = Literal["sft", "grpo", "opd", "dagger", "aggrevate"]


def models_dir() -> Path:
    return Path(os.environ.get("UNIPOST_MODELS_DIR", "/models"))


def sft_data_path() -> str:
    """Where SFT's stored teacher trajectories are (``UNIPOST_SFT_DATA``)."""
    return os.environ.get("UNIPOST_SFT_DATA", "runs/paper/teacher-rollouts.jsonl")


def _optim(recipe: Recipe) -> OptimConfig:
    common = dict(micro_batch_tokens=CONTEXT_TOKENS, grad_accumulation=value("grad accumulation"))
    if recipe == "sft":  # one stored dataset, several epochs (an iteration is one epoch over it)
        return OptimConfig(
            lr=value("sft max lr"),
            schedule=value("sft lr schedule"),
            warmup_ratio=value("sft warmup ratio"),
            min_lr_ratio=value("sft min lr ratio"),
            **common,
        )
    if recipe == "grpo":
        return OptimConfig(lr=value("grpo lr"), schedule=value("grpo lr schedule"), **common)
    return OptimConfig(
        lr=value("online lr"),
        schedule=value("online lr schedule"),
        epochs_per_batch=value("online epochs per batch"),
        **common,
    )


def paper_swe_config(
    recipe: Recipe,
    student: Literal["qwen3-4b", "qwen3-8b"] = "qwen3-4b",
    *,
    output_dir: str = "runs/paper",
    white_box_teacher: bool | None = None,
    **recipe_kwargs: Any,
) -> TrainConfig:
    """The paper's SWE-Gym training run of ``recipe`` for ``student``.

    ``white_box_teacher``: load the teacher's weights locally for token log-probs (OPD needs them; the
    §4.4 reverse-KL diagnostic uses them). Default: only for OPD. DAgger, AggreVaTe and SFT need only the
    teacher's *actions*, which the vLLM endpoint serves.

    SFT trains on a stored dataset (``UNIPOST_SFT_DATA``, see :func:`collect_sft_dataset`) for
    ``sft epochs`` iterations; GRPO trains on SkyRL-v0 (``UNIPOST_SKYRL_V0``) for ``grpo passes``
    passes and is evaluated on SWE-Gym Holdout, like every other method.
    """
    white_box = recipe == "opd" if white_box_teacher is None else white_box_teacher
    swe_gym = os.environ.get("UNIPOST_SWE_GYM", "data/swe-gym.jsonl")
    tasks_path, heldout_path = swe_gym, None
    iterations, episodes = ITERATIONS, EPISODES_PER_ITERATION
    if recipe == "sft":
        recipe_kwargs = {"data": sft_data_path(), **recipe_kwargs}
        iterations = value("sft epochs")
    elif recipe == "grpo":
        recipe_kwargs = {"group_size": value("grpo group size"), **recipe_kwargs}
        tasks_path = os.environ.get("UNIPOST_SKYRL_V0", "data/skyrl-v0.jsonl")
        heldout_path = swe_gym  # evaluated on SWE-Gym Holdout like every method
        episodes = value("grpo tasks per iteration")
        iterations = math.ceil(value("grpo passes") * value("grpo instances") / episodes)
    return TrainConfig(
        name=f"{student}-{recipe}",
        recipe=recipe,
        recipe_kwargs=recipe_kwargs,
        iterations=iterations,
        seed=0,
        output_dir=output_dir,
        model=ModelConfig(kind="pretrained", path=str(models_dir() / STUDENTS[student]), dtype="bfloat16"),
        warm_start=WarmStartConfig(demos=0),  # paper: the instruct model is the initialisation
        teacher=TeacherConfig(
            kind="openai",
            base_url=os.environ.get("UNIPOST_TEACHER_URL", "http://localhost:8000/v1"),
            model=TEACHER,  # vllm serve ... --served-model-name Qwen3-Coder-30B-A3B-Instruct
            timeout_s=600.0,  # ours: long-context generations of a 30B MoE under load
            white_box="pretrained" if white_box else "none",
            white_box_path=str(models_dir() / TEACHER) if white_box else None,
        ),
        env=EnvConfig(
            name="swe",
            tasks_path=tasks_path,
            heldout_tasks_path=heldout_path,
            split_file=os.environ.get("UNIPOST_SWE_SPLIT"),  # paper: a fixed SWE-Gym Holdout split
            image_scheme="swegym",
            full_tool_descriptions=True,  # paper: OpenHands' own tool descriptions (its action space)
            max_observation_chars=16_000,  # ours: keeps one observation well inside the context
            train_tasks=100_000,  # every instance of the train split (the pool is capped by the file)
            heldout_tasks=value("heldout tasks"),  # capped by what the split holds
        ),
        rollout=RolloutConfig(
            episodes_per_iteration=episodes,
            max_turns=MAX_TURNS,
            context_budget=CONTEXT_TOKENS,
            max_new_tokens=value("max new tokens per turn"),
            temperature=TEMPERATURE,
            top_p=TOP_P,
            concurrency=64,
            backend="vllm",  # the student's engine, weights synced after every optimisation step
            vllm=VLLMEngineConfig(gpu_memory_utilization=0.35),  # ours: shares the GPU with training
        ),
        optim=_optim(recipe),
        eval=EvalConfig(every=2, kl_tasks=16 if white_box else 0),
        progress=True,
    )


def collect_sft_dataset(config: TrainConfig, out: str | Path | None = None) -> Path:
    """SFT's dataset (App. F.2): one teacher rollout of every training task, appended to ``out``.

    Rejection sampling happens when training reads it (``SFT()`` keeps resolved trajectories only), so
    the store keeps every rollout and its outcome. Builds a Trainer for the online SFT recipe to reuse
    its environment, teacher and budgets (the student acts in no rollout; transformers backend, so no
    vLLM engine is started for it).
    """
    from unipost.rollout.store import TrajectoryStore
    from unipost.train.trainer import Trainer

    path = Path(out or sft_data_path())
    online = config.replace(
        recipe="sft",
        recipe_kwargs={},
        rollout=config.rollout.model_copy(update={"backend": "transformers"}),
        eval=EvalConfig(every=0, kl_tasks=0),
    )
    trainer = Trainer(online)
    assert trainer.engine is not None  # TeacherRollout collects
    trainer.engine.collect(trainer.train_tasks(), 0, store=TrajectoryStore(path))
    return path


def provenance_markdown() -> str:
    """:data:`PROVENANCE` as the Markdown table of experiments/README.md (a test keeps them equal)."""
    rows = ["| setting | value | source | quote (paper) or reason (ours) |", "|---|---|---|---|"]
    for key, item in PROVENANCE.items():
        note = f'"{item.note}"' if item.source == "paper" else item.note
        rows.append(f"| {key} | `{item.value}` | {item.source} | {note} |")
    return "\n".join(rows) + "\n"
