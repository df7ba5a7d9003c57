"""Typed, validated training configuration (pydantic). Every field says what it is for.

An experiment file builds a :class:`TrainConfig` and calls :func:`unipost.train.train`; a bad value
fails at construction with a message naming the field and what to change.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from unipost.rollout.sampling import SamplingConfig


class ConfigError(ValueError):
    """A configuration that cannot run, with what to change."""


class _Strict(BaseModel):
    """Frozen, and an unknown field is an error that names the closest known one ("did you mean ...?").

    A misspelt field would otherwise be silently ignored (a run with the default instead of the value
    meant) or, with pydantic's plain ``extra="forbid"``, refused without saying what was meant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if isinstance(k, str) and k not in cls.model_fields]
            if unknown:
                raise ValueError(unknown_field_message(cls.__name__, unknown[0], list(cls.model_fields)))
        return data


def unknown_field_message(owner: str, name: str, known: list[str]) -> str:
    """``"TrainConfig has no field 'iteratons'; did you mean 'iterations'?"`` (or the list of fields)."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"its fields are: {', '.join(known)}"
    return f"{owner} has no field {name!r}; {hint}"


class ModelConfig(_Strict):
    """The student: a tiny Qwen3 built from a config (CPU), or a local pretrained directory."""

    kind: Literal["tiny", "pretrained"] = Field(
        "tiny",
        description="'tiny': a Qwen3-architecture model built from the sizes below (random init, "
        "then the warm start); 'pretrained': a local HF model directory (path)",
    )
    path: str | None = Field(
        None, description="pretrained model directory (kind='pretrained'); never a hub id"
    )
    hidden_size: int = Field(128, ge=8, description="tiny model width")
    num_layers: int = Field(2, ge=1, description="tiny model depth")
    num_heads: int = Field(4, ge=1, description="tiny model attention heads (must divide hidden_size)")
    num_kv_heads: int = Field(2, ge=1, description="tiny model key/value heads (grouped-query attention)")
    tokenizer_vocab: int = Field(2048, ge=300, description="size of the locally trained BPE tokenizer")
    lora_rank: int | None = Field(None, ge=1, description="train a PEFT LoRA adapter of this rank instead")
    lora_alpha: int = Field(16, description="LoRA scaling numerator (the update is scaled by alpha / rank)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the student's parameter dtype (bfloat16 halves memory on GPU)"
    )

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> ModelConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("model.kind='pretrained' needs model.path (a local directory)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        return self


class WarmStartConfig(_Strict):
    """The student's initialisation: brief behaviour cloning on expert demos (our 'instruct' stage).

    The paper starts from instruction-tuned students that already speak the tool format; a random-init
    tiny model does not, so every method starts from the same cached warm start.
    """

    demos: int = Field(24, ge=0, description="expert trajectories (train split) to clone; 0 = random init")
    epochs: int = Field(6, ge=1, description="behaviour-cloning epochs over the demos")
    lr: float = Field(3e-3, gt=0, description="behaviour-cloning learning rate (AdamW)")


class TeacherConfig(_Strict):
    """Who labels and executes teacher turns."""

    kind: Literal["expert", "openai"] = Field(
        "expert",
        description="'expert': the embedded env's scripted expert; 'openai': an OpenAI-compatible "
        "endpoint (base_url + model), e.g. `vllm serve`",
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint (kind='openai'), e.g. vllm serve"
    )
    model: str | None = Field(None, description="the endpoint's model name (kind='openai')")
    api_key_env: str = Field("UNIPOST_TEACHER_API_KEY", description="env var holding the key; never stored")
    max_retries: int = Field(4, ge=0, description="retries (with backoff) before the teacher counts as down")
    timeout_s: float = Field(60.0, gt=0, description="seconds one teacher request may take")
    white_box: Literal["none", "distilled", "pretrained"] = Field(
        "distilled",
        description="white-box teacher LM for OPD and the reverse-KL diagnostic: 'distilled' = the "
        "student's network behaviour-cloned on the warm-start demos for distill_epochs (cached); "
        "'pretrained' = a local model directory (white_box_path) sharing the student's vocabulary, "
        "e.g. the weights behind the vLLM teacher endpoint",
    )
    white_box_path: str | None = Field(
        None, description="local directory of the white-box teacher (white_box='pretrained'); never a hub id"
    )
    white_box_dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="dtype the pretrained white-box teacher is loaded in (it is never trained)"
    )
    distill_epochs: int = Field(8, ge=1, description="epochs of the distilled teacher (>= warm_start.epochs)")

    @model_validator(mode="after")
    def _endpoint(self) -> TeacherConfig:
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("teacher.kind='openai' needs teacher.base_url and teacher.model")
        if self.white_box == "pretrained" and not self.white_box_path:
            raise ValueError("teacher.white_box='pretrained' needs teacher.white_box_path (a local dir)")
        return self


class EnvConfig(_Strict):
    """The environment: built by ``unipost.envs.registry.make_env_factory``; tasks are (split, index)."""

    name: Literal["embedded", "openhands", "swe"] = Field(
        "embedded",
        description="embedded: the mini-SWE world (bubblewrap); openhands: the same embedded tasks acted on "
        "through the real OpenHands SDK tools (needs .venv-openhands, scripts/setup-openhands-venv.sh); "
        "swe: SWE-Gym / SWE-bench instances from tasks_path, one Docker container each (needs Docker)",
    )
    difficulty: str = Field("easy", description="easy | medium | hard | expert | marathon")
    train_tasks: int = Field(
        64,
        ge=1,
        description="size of the training task pool (train split); for swe an upper bound: the pool is "
        "the first min(train_tasks, instances in the train split) instances",
    )
    heldout_tasks: int = Field(
        16,
        ge=1,
        description="held-out tasks for evaluation; for swe an upper bound, like train_tasks",
    )
    max_observation_chars: int = Field(
        1200, ge=100, description="tool observations are cut to this many characters"
    )
    full_tool_descriptions: bool = Field(
        False,
        description="openhands/swe: offer OpenHands' own ~4k-character tool descriptions (the paper's action "
        "space) instead of the compact ones small models' contexts can hold",
    )
    prompt_tools: bool = Field(
        True,
        description="embedded: render the tool schemas into the system prompt (~900 tokens). The tiny lab "
        "sets False: a from-scratch student cannot read JSON schemas, learns the call format from demos, and "
        "the constant block would double every episode's tokens (and quadruple causal attention pairs)",
    )
    openhands_venv: str | None = Field(
        None, description="openhands: the Python >= 3.12 venv with openhands-sdk (default .venv-openhands)"
    )
    tasks_path: str | None = Field(
        None, description="swe: JSONL of instances in the public SWE-bench / SWE-Gym format"
    )
    heldout_tasks_path: str | None = Field(
        None,
        description="swe: JSONL the held-out split is drawn from, when it is not tasks_path (the paper's "
        "GRPO trains on SkyRL-v0 and is evaluated on SWE-Gym Holdout). Both files are split by the same "
        "instance-id hash (or split_file), so no held-out instance is ever trained on",
    )
    split_file: str | None = Field(
        None, description='swe: JSON {"train": [ids], "heldout": [ids]}; default: split by instance-id hash'
    )
    heldout_fraction: float = Field(
        0.1, ge=0, le=1, description="swe: share of instances held out by the instance-id hash split"
    )
    image_scheme: Literal["swebench", "swegym"] = Field(
        "swebench", description="swe: per-instance image names of SWE-bench's harness or of SWE-Gym"
    )
    swe_grading: Literal["container", "none"] = Field(
        "container",
        description="swe: 'container' grades each submitted episode in its own container (test patch "
        "applied, FAIL_TO_PASS / PASS_TO_PASS run; unipost.envs.swe.grading), as training rewards and "
        "rejection sampling need; 'none' only extracts the patch and leaves grading to the swebench harness",
    )
    swe_grading_timeout_s: float = Field(
        1800.0, gt=0, description="swe: kill timeout of one in-container test run (seconds)"
    )
    swe_agent_user: str | None = Field(
        "auto",
        description="swe: who the agent's commands run as in the container: 'auto' (the host user's uid:gid, "
        "or 1000:1000 under a root host), 'uid:gid', or null for the image's user (root in SWE-bench "
        "images; needed where container uids are remapped)",
    )

    @model_validator(mode="after")
    def _swe_needs_tasks(self) -> EnvConfig:
        if self.name == "swe" and not self.tasks_path:
            raise ValueError("env.name='swe' needs env.tasks_path (a JSONL of SWE-bench-format instances)")
        return self

    @field_validator("difficulty")
    @classmethod
    def _known(cls, v: str) -> str:
        from unipost.envs.embedded.tasks import DIFFICULTIES

        if v not in DIFFICULTIES:
            raise ValueError(f"env.difficulty={v!r} unknown; choose one of {sorted(DIFFICULTIES)}")
        return v


class VLLMEngineConfig(_Strict):
    """The vLLM engine of the student (rollout.backend='vllm'); see unipost.rollout.vllm_policy."""

    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory vLLM may take (weights + KV cache)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the student's engine is sharded over")
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV-cache size in GiB; None = vLLM's own sizing on GPU, 1 GiB on a CPU-only machine",
    )
    enforce_eager: bool = Field(False, description="skip CUDA-graph capture (faster start, slower decode)")


class RolloutConfig(_Strict):
    """How training rollouts are collected. The sampling settings apply to the student AND to a model
    teacher (paper App. F.1: "For all methods, including baselines, rollout collection uses
    temperature [..] and top-[p]"); evaluation is greedy."""

    episodes_per_iteration: int = Field(8, ge=1, description="tasks per iteration (x recipe group size)")
    max_turns: int = Field(16, ge=1, description="turn budget per episode")
    context_budget: int = Field(4096, ge=64, description="max tokens of the student's prompt")
    max_new_tokens: int = Field(160, ge=8, description="generation budget per turn (tokens)")
    temperature: float = Field(1.0, description="rollout sampling temperature, > 0 (eval is greedy)")
    top_p: float = Field(1.0, description="rollout nucleus sampling mass in (0, 1]; 1 = off")
    concurrency: int = Field(8, ge=1, description="episodes in flight (the student's generation batch)")
    defer_labels: bool = Field(
        True,
        description="ask an API teacher (messages_only) for DAgger's labels off the tick's critical path, "
        "resolved before the batch is returned (unipost.rollout.label_queue); False: each tick waits for "
        "its labels (the synchronous path). The scripted expert is always synchronous. Labels equal the "
        "synchronous path's for a greedy teacher; a sampling teacher's one answer per distinct state is "
        "shared by identical states (a group of identical prefixes gets one sampled label)",
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="who generates the student's turns: 'transformers' (model.generate, the CPU path) or "
        "'vllm' (an in-process vLLM engine, the trainer's weights pushed into it after every "
        "optimisation step; needs vllm, see scripts/setup-vllm-venv.sh for CPU)",
    )
    vllm: VLLMEngineConfig = Field(
        VLLMEngineConfig(), description="engine settings when backend='vllm' (ignored otherwise)"
    )

    @model_validator(mode="after")
    def _sampling_is_valid(self) -> RolloutConfig:
        self.sampling()  # the policies' own checks (SamplingConfig), in their words, at config time
        return self

    def sampling(self) -> SamplingConfig:
        """The one sampling config every rollout policy (student and model teacher) is built with."""
        from unipost.rollout.sampling import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p
        )


class OptimConfig(_Strict):
    """The optimiser and its LR schedule. Every schedule length is in optimiser steps."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warmup: constant, or cosine down to min_lr_ratio * lr at the last step"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup, in optimiser steps")
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="linear warmup as a fraction of all optimiser steps of the run (the paper's SFT "
        "'warmup ratio'); exclusive with warmup_steps",
    )
    total_steps: int | None = Field(
        None,
        ge=1,
        description="optimiser steps of the whole run, the horizon of warmup_ratio and cosine. None: "
        "counted exactly for offline data (iterations x epochs x steps per epoch), else estimated "
        "from the first iteration's batch (iterations x epochs x its steps) and kept in checkpoints",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine's final LR as a fraction of lr")
    epochs_per_batch: int = Field(1, ge=1, description="passes over each collected batch")
    micro_batch_tokens: int = Field(8192, ge=64, description="packed tokens per forward/backward")
    grad_accumulation: int = Field(
        1,
        ge=1,
        description="micro-batches per optimiser step, counted over ALL processes: the same value gives "
        "the same updates on 1 or N processes (unipost.train.distributed); with N processes use a "
        "multiple of N so none runs zero-weighted padding",
    )
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; None = no clipping")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    head: Literal["auto", "fused_loss", "logprobs"] = Field(
        "auto",
        description="the LM head's path: 'fused_loss' forms the gradients inside the forward sweep (three "
        "GEMMs; needs a loss of per-token terms: every built-in recipe), 'logprobs' returns log-probs and "
        "takes any loss (four GEMMs); 'auto' picks 'fused_loss' where it applies on the torch (CPU) "
        "kernel, else 'logprobs' (unipost.batch.select_head). Same loss and gradients to fp32 rounding",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("optim.warmup_steps and optim.warmup_ratio are exclusive; set one of them")
        return self


class ReferenceConfig(_Strict):
    """The frozen reference model of a KL regulariser (``Need.REFERENCE_LOGPROBS``, e.g. GRPO's kl_coef)."""

    kind: Literal["initial", "checkpoint", "none"] = Field(
        "initial",
        description="initial: a frozen copy of the student as the run starts (GRPO's pi_ref); checkpoint: "
        "a local model directory (path); none: no reference, so a recipe that needs one is refused",
    )
    path: str | None = Field(
        None, description="reference model directory (kind='checkpoint'), never a hub id"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype a checkpoint is loaded in")

    @model_validator(mode="after")
    def _path(self) -> ReferenceConfig:
        if self.kind == "checkpoint" and not self.path:
            raise ValueError("reference.kind='checkpoint' needs reference.path (a local directory)")
        return self


class EvalConfig(_Strict):
    """Held-out evaluation during training: greedy episodes and the reverse-KL diagnostic."""

    every: int = Field(
        1, ge=0, description="evaluate before training, every N iterations and after the last; 0 = never"
    )
    kl_tasks: int = Field(8, ge=0, description="student rollouts for the reverse-KL diagnostic (0 = off)")
    expert_labels: bool = Field(
        False,
        description="also ask the scripted expert (embedded env) for its action at every greedy held-out "
        "student state: secondary metrics eval/expert_agreement, eval/expert_prefix and eval/expert_nll",
    )
    judge_base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint of an LLM judge of failure modes (paper §4.5: one primary "
        "Table-4 mode per unresolved episode, unipost.eval.judge); None = the environment's rules",
    )
    judge_model: str | None = Field(None, description="the judge model's name at judge_base_url")
    judge_api_key_env: str = Field("UNIPOST_JUDGE_API_KEY", description="env var holding the judge's key")

    @model_validator(mode="after")
    def _judge(self) -> EvalConfig:
        if bool(self.judge_base_url) != bool(self.judge_model):
            raise ValueError("eval.judge_base_url and eval.judge_model go together (or neither)")
        return self


class TrainConfig(_Strict):
    """One training run: a recipe, a student, a teacher, an environment, and the loop's knobs."""

    name: str = Field("run", description="the run's folder name under output_dir")
    recipe: str = Field(
        "dagger",
        description="sft | grpo | opd | dagger | aggrevate, or 'custom': the composition in recipe_spec",
    )
    recipe_kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments of the named recipe")
    recipe_spec: dict[str, Any] | None = Field(
        None,
        description="recipe='custom': the recipe's parts and their arguments (Recipe.to_spec()). The "
        "Trainer writes it when handed a recipe object that no named recipe of this config equals, so a "
        "run's config.json rebuilds the recipe it ran (with_recipe)",
    )
    iterations: int = Field(
        6, ge=1, description="collect -> optimise iterations (an upper bound under a budget)"
    )
    max_effective_samples: int | None = Field(
        None,
        ge=1,
        description="matched budget (paper §4.3): stop once this many labelled transitions (the "
        "train/effective_samples count) were trained on; the last batch is cut to the shortest prefix "
        "of its trajectories that reaches the budget (overshoot < one trajectory's labels). iterations "
        "stays the upper bound",
    )
    aggregate: bool = Field(False, description="classic DAgger D = D_1 u ... u D_i instead of a fresh batch")
    seed: int = Field(0, ge=0, description="seeds the model init, task sampling, rollouts and batching")
    output_dir: str = Field("runs", description="runs are written to output_dir/name")
    model: ModelConfig = Field(ModelConfig(), description="the student")
    warm_start: WarmStartConfig = Field(WarmStartConfig(), description="the student's initialisation")
    teacher: TeacherConfig = Field(TeacherConfig(), description="who labels and executes teacher turns")
    reference: ReferenceConfig = Field(ReferenceConfig(), description="the frozen model a KL term pulls to")
    env: EnvConfig = Field(EnvConfig(), description="the environment and its task splits")
    rollout: RolloutConfig = Field(RolloutConfig(), description="how training rollouts are collected")
    optim: OptimConfig = Field(OptimConfig(), description="the optimiser and its LR schedule")
    eval: EvalConfig = Field(EvalConfig(), description="held-out evaluation during training")
    progress: bool = Field(True, description="progress bars and per-iteration lines on the terminal")
    cache_dir: str | None = Field(None, description="where warm starts / distilled teachers are cached")

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        from unipost.objective import RECIPES

        key = v.lower()
        if key != "custom" and key not in {k.lower() for k in RECIPES}:
            raise ValueError(f"recipe={v!r} unknown; choose one of {sorted(RECIPES)} or 'custom'")
        return key

    @model_validator(mode="after")
    def _custom_has_spec(self) -> TrainConfig:
        if (self.recipe == "custom") != (self.recipe_spec is not None):
            raise ValueError(
                "recipe='custom' goes with recipe_spec (a recipe's composition, Recipe.to_spec()) and a "
                "named recipe without it; got "
                f"recipe={self.recipe!r} and recipe_spec={'set' if self.recipe_spec else None}"
            )
        if self.recipe == "custom" and self.recipe_kwargs:
            raise ValueError("recipe='custom' takes its arguments from recipe_spec; leave recipe_kwargs {}")
        return self

    @model_validator(mode="after")
    def _distilled_teacher_needs_tiny_student(self) -> TrainConfig:
        if self.model.kind == "pretrained" and self.teacher.white_box == "distilled":
            raise ValueError(
                "teacher.white_box='distilled' builds a tiny teacher on the task tokenizer, which does not "
                "match a pretrained student's vocabulary; set teacher.white_box='none' (DAgger/SFT/AggreVaTe "
                "need only actions) or, for OPD and the KL diagnostic, teacher.white_box='pretrained' with "
                "a same-family teacher.white_box_path (or pass teacher_model to Trainer)"
            )
        return self

    @model_validator(mode="after")
    def _teacher_trained_longer(self) -> TrainConfig:
        if self.teacher.white_box == "distilled" and self.teacher.distill_epochs < self.warm_start.epochs:
            raise ValueError(
                f"teacher.distill_epochs={self.teacher.distill_epochs} < warm_start.epochs="
                f"{self.warm_start.epochs}: the distilled teacher must train at least as long as the student"
            )
        return self

    @model_validator(mode="after")
    def _recipe_builds(self) -> TrainConfig:
        from unipost.objective.spec import unsaved_parts

        if self.recipe_spec is not None and unsaved_parts(self.recipe_spec):
            return self  # a faithful record of a recipe that only code can rebuild: build_recipe says so
        self.build_recipe()  # surfaces e.g. beta outside [0, 1] now, naming the bad part
        return self

    def build_recipe(self):
        """The run's Recipe: the named one with recipe_kwargs, or the composition in recipe_spec."""
        from unipost.objective import RecipeError, get_recipe, recipe_from_spec

        if self.recipe_spec is not None:
            try:
                return recipe_from_spec(self.recipe_spec)
            except (RecipeError, ValueError, TypeError) as exc:
                raise ConfigError(f"recipe='custom': {exc}") from exc
        try:
            return get_recipe(self.recipe, **self.recipe_kwargs)
        except (RecipeError, ValueError, TypeError) as exc:
            raise ValueError(
                f"recipe {self.recipe!r} with recipe_kwargs={self.recipe_kwargs}: {exc}"
            ) from exc

    def with_recipe(self, recipe: Any) -> TrainConfig:
        """This config recording ``recipe`` (a Recipe object): unchanged when its named recipe equals it,
        else ``recipe='custom'`` with the composition in ``recipe_spec``, never a named recipe it is not."""
        try:
            if self.build_recipe() == recipe:
                return self
        except ValueError:  # a recorded recipe only code can rebuild: record the one given
            pass
        return self.replace(recipe="custom", recipe_kwargs={}, recipe_spec=recipe.to_spec())

    def replace(self, **updates: Any) -> TrainConfig:
        """A validated copy with top-level fields replaced (``model_copy`` would skip validation)."""
        return type(self).model_validate({**dict(self), **updates})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_json(self) -> str:
        """The config as saved with a run (no secrets: keys live in the environment only)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, default=str)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.model_validate_json(Path(path).read_text())
