"""The tiny CPU lab: the one place that says what a CPU-sized run is.

The README's main job, ``benchmarks/bench_methods.py``, the notebooks and the tests all start from
:func:`tiny_config`, so they share one student, one teacher, one environment setting and one set of
budgets, and a change to any of them is made here once.

The student and the white-box teacher are the shipped warm start (``unipost/assets/tiny-lab/``, built by
``scripts/build-warm-start.py``; :mod:`unipost.train.warm_start` says why it is shipped and how it was
chosen). Its files are checked against the manifest's hashes before a run uses them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from unipost.train.config import (
    EnvConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
)
from unipost.train.warm_start import ASSETS, MAX_NEW_TOKENS, MAX_TURNS, load_manifest

# DAgger's beta_i = max(0.2, 0.6 - 0.2 i) in the lab (ours; the paper's numbers were lost in
# extraction): the warm start already acts sensibly, so student-executed turns start at 40% and the
# floor keeps teacher recoveries in every batch.
LAB_BETA = {"start": 0.6, "step": 0.2, "floor": 0.2}


@cache
def warm_start(root: str | None = None) -> dict[str, Any]:
    """The verified manifest of the lab's warm start (raises naming the rebuild command if it is off)."""
    manifest = load_manifest(Path(root) if root else ASSETS)
    manifest["root"] = str(Path(root) if root else ASSETS)
    return manifest


def tiny_config(
    output_dir: str = "runs/lab",
    *,
    recipe: str = "dagger",
    quick: bool = False,
    assets: str | None = None,
    **overrides: Any,
) -> TrainConfig:
    """The CPU lab's TrainConfig: shipped warm start, easy embedded tasks, minutes per run.

    Args:
        output_dir: where runs are written (``<output_dir>/<name>``).
        recipe: a named recipe (``sft | grpo | opd | dagger | aggrevate``); DAgger gets the lab's beta.
        quick: seconds-long budgets for tests (same student and teacher).
        assets: a warm-start directory other than the shipped one (e.g. a ``--quick`` build in a test).
        overrides: top-level TrainConfig fields to replace, e.g. ``iterations=2`` or
            ``rollout=RolloutConfig(...)`` (validated like any config). A dict for a section updates
            only the fields it names (``rollout={"max_turns": 4}`` keeps the lab's other rollout
            settings), so callers state what differs from the lab instead of copying the rest.
    """
    root = warm_start(assets)["root"]
    recipe_kwargs = {"beta": dict(LAB_BETA)} if recipe.lower() == "dagger" else {}
    config = TrainConfig(
        name=recipe,
        recipe=recipe,
        recipe_kwargs=recipe_kwargs,
        iterations=1 if quick else 4,
        output_dir=output_dir,
        model=ModelConfig(kind="pretrained", path=str(Path(root) / "student")),
        teacher=TeacherConfig(
            white_box="pretrained", white_box_path=str(Path(root) / "teacher"), white_box_dtype="float32"
        ),
        env=EnvConfig(
            difficulty="easy",
            train_tasks=256,
            heldout_tasks=2 if quick else 30,
            max_observation_chars=1200,
            prompt_tools=False,
        ),
        rollout=RolloutConfig(
            episodes_per_iteration=2 if quick else 16,
            max_turns=8 if quick else MAX_TURNS,
            context_budget=3072,
            max_new_tokens=24 if quick else MAX_NEW_TOKENS,
            temperature=0.7,
            # every held-out episode in one batched generate: on CPU a batch of 16 ran ~8x the
            # turns/s of one at a time (benchmarks/README.md, Rollout throughput), and 30-50 held-out
            # episodes in flight replace 2-4 refills with one
            concurrency=64,
        ),
        # the warm start is a converged behaviour-cloning optimum: a fresh AdamW at lr 3e-4 on one
        # iteration's ~100-160 labelled turns per step cost DAgger 17 points and SFT 9 on validation tasks;
        # lr 1e-4 with 4 micro-batches per step kept both within 2-3 points, intervals over 0
        # (experiments/ablations/README.md, issue 20)
        optim=OptimConfig(
            lr=1e-4,
            grad_accumulation=1 if quick else 4,
            epochs_per_batch=1 if quick else 2,
            micro_batch_tokens=4096,
        ),
        eval=EvalConfig(every=1 if quick else 2, kl_tasks=1 if quick else 4),
    )
    for key, value in overrides.items():  # a dict for a section: only the fields it names change
        section = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(section, BaseModel):
            overrides[key] = {**dict(section), **value}
    return config.replace(**overrides) if overrides else config
