"""Trainer with rollout.backend='vllm': the student's turns come from a vLLM engine that receives the
trainer's weights after every optimisation step (DAgger on the embedded environment, tiny model)."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_train_config
from vllm_cases import TINY_VLLM, make_states

from unipost.envs.embedded import bwrap_available
from unipost.rollout.transformers_policy import TransformersPolicy
from unipost.rollout.vllm_policy import VLLMPolicy
from unipost.train.config import ModelConfig
from unipost.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="the embedded environment needs bubblewrap")


def test_trainer_rolls_out_with_vllm_and_syncs_after_each_step(tmp_path):
    base = tiny_train_config(
        tmp_path / "runs",
        tmp_path / "cache",
        "dagger",
        iterations=1,
        recipe_kwargs={"beta": 0.5, "filter_unsubmitted": False},  # student turns from iteration 0
    )
    config = base.replace(
        model=ModelConfig(**TINY_VLLM, tokenizer_vocab=1024),
        rollout=base.rollout.model_copy(update={"backend": "vllm"}),
    )
    trainer = Trainer(config)
    try:
        assert isinstance(trainer.student_policy, VLLMPolicy)
        before = [p.detach().clone() for p in trainer.student.parameters()]
        metrics = trainer.run_iteration(0)
        assert metrics["rollout/student_queries"] > 0  # the engine executed student turns
        assert metrics["train/batch_labels"] > 0
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.student.parameters(), strict=True))
        assert trainer.student_policy.weight_version == 1
        # the engine now serves the trained weights: greedy turns equal the trained module's
        states = make_states()
        ours = trainer.student_policy.act(states, greedy=True)
        hf = TransformersPolicy(trainer.student, trainer.tokenizer, max_new_tokens=16).act(
            states, greedy=True
        )
        assert [o.token_ids for o in ours] == [o.token_ids for o in hf]
    finally:
        trainer.student_policy.close()
