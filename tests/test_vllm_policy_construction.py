"""VLLMPolicy's constructor cleans up after itself when it fails, with or without vLLM installed.

vLLM is replaced by a stub module (``require`` is patched), so these run in the main venv: only the
constructor's own bookkeeping is under test, not the engine.
"""

from __future__ import annotations

import copy
import tempfile
import types
from pathlib import Path

import pytest

from unipost.rollout import vllm_policy
from unipost.rollout.vllm_policy import VLLMPolicy


class EngineStartError(RuntimeError):
    pass


def _failing_engine(**kwargs: object) -> None:
    raise EngineStartError("no room for the KV cache")


@pytest.fixture
def temp_root(monkeypatch, tmp_path) -> Path:
    """Where ``tempfile.mkdtemp`` puts the temporary model copy, with vLLM stubbed by a failing engine."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # The in-process constructor sets this for vLLM before the (failing) engine starts; monkeypatch
    # restores it afterwards, so it does not leak into later tests of the same worker.
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(vllm_policy, "require", lambda name: types.SimpleNamespace(LLM=_failing_engine))
    return tmp_path


def test_failed_chat_template_check_removes_the_temporary_copy(temp_root, tiny_model, tokenizer):
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        VLLMPolicy(tiny_model, no_template)
    assert list(temp_root.iterdir()) == []


def test_failed_engine_start_removes_the_temporary_copy(temp_root, tiny_model, tokenizer):
    with pytest.raises(EngineStartError):
        VLLMPolicy(tiny_model, tokenizer)
    assert list(temp_root.iterdir()) == []


def test_failed_engine_start_leaves_a_model_directory_alone(temp_root, tiny_model, tokenizer):
    """Only what the constructor made is removed: a caller's model directory stays."""
    model_dir = temp_root / "model"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(EngineStartError):
        VLLMPolicy(model_dir, tokenizer)
    assert sorted(p.name for p in temp_root.iterdir()) == ["model"]
    assert (model_dir / "config.json").is_file()
