"""Opt-in vLLM tests: collected only where vllm imports (``.venv-vllm``, built by
scripts/setup-vllm-venv.sh and run by scripts/ci-optional/10-vllm.sh). In the main venv only
test_vllm_missing.py runs (the clear error when vllm is absent).

The folder is not called ``tests/vllm``: pytest puts ``tests/`` on sys.path, where a ``vllm`` folder
would make ``import vllm`` find it as a namespace package in a venv without vllm.

The model is a random-init tiny Qwen3 with head_dim 32 (vLLM's CPU attention supports head sizes
>= 32; the default tiny model has 16) and the locally trained tokenizer: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util

import pytest

_spec = importlib.util.find_spec("vllm")
HAS_VLLM = _spec is not None and _spec.origin is not None  # not a namespace package
if not HAS_VLLM:
    collect_ignore_glob = ["test_vllm_[!m]*.py"]  # everything but test_vllm_missing.py

from vllm_cases import TARGET, TINY_VLLM, make_states, train_to_emit  # noqa: E402


@pytest.fixture(scope="session")
def random_model(tokenizer):
    from unipost.models import build_tiny_qwen3

    return build_tiny_qwen3(len(tokenizer), seed=0, **TINY_VLLM).eval()


@pytest.fixture(scope="session")
def trained_model(tokenizer, random_model):
    """The random model after supervised steps towards TARGET (a separate copy)."""
    import copy

    model = copy.deepcopy(random_model)
    steps = train_to_emit(model, tokenizer, make_states(), TARGET)
    assert steps < 199, "the tiny model did not learn to emit TARGET"
    return model
