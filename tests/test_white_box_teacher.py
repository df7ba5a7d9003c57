"""teacher.white_box='pretrained': a local same-vocabulary checkpoint scores the student's tokens.

This is the paper-scale path for OPD and the reverse-KL diagnostic (the weights behind the vLLM teacher
endpoint, loaded locally); here the "teacher" is a tiny Qwen3 saved to disk.
"""

from __future__ import annotations

import pytest
import torch
from factories import session_cache, tiny_train_config
from transformers import Qwen3Config, Qwen3ForCausalLM

from unipost.train.config import TeacherConfig
from unipost.train.trainer import ConfigError, Trainer


def _save_tiny(path, vocab_size: int, seed: int = 3) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def _config(tmp_path, teacher_dir):
    return tiny_train_config(
        tmp_path / "runs",
        session_cache(),
        "opd",
        teacher=TeacherConfig(
            white_box="pretrained", white_box_path=str(teacher_dir), white_box_dtype="float32"
        ),
    )


def test_pretrained_white_box_teacher_is_loaded_frozen(tmp_path):
    cfg = _config(tmp_path, tmp_path / "teacher")
    vocab = 1024 + 64  # >= the task tokenizer's size (1024 + special tokens)
    saved = _save_tiny(tmp_path / "teacher", vocab)
    trainer = Trainer(cfg)
    teacher = trainer.teacher_model
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.lm_head.weight, saved.lm_head.weight, rtol=0, atol=0)


def test_pretrained_white_box_teacher_with_another_vocabulary_is_refused(tmp_path):
    cfg = _config(tmp_path, tmp_path / "teacher")
    _save_tiny(tmp_path / "teacher", vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary"):
        Trainer(cfg)


def test_pretrained_white_box_needs_a_path():
    with pytest.raises(ValueError, match="white_box_path"):
        TeacherConfig(white_box="pretrained")
