"""Shared fixtures: a locally trained tokenizer and tiny random-init Qwen3 models (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    from unipost.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    from unipost.models import build_tiny_qwen3

    return build_tiny_qwen3(len(tokenizer), seed=0)
