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


@pytest.fixture(scope="session")
def lab_assets(tmp_path_factory) -> str:
    """A ``--quick`` tiny-lab warm start (student, teacher, manifest), built once per session.

    The same code and spec as ``scripts/build-warm-start.py --quick`` (its QUICK dict is read from the
    script, not copied): tests pass it as ``tiny_config(assets=...)`` / ``--assets`` so they neither wait
    for nor depend on the shipped warm start, and share one build instead of one each.
    """
    import runpy
    from pathlib import Path

    from unipost.train.warm_start import WarmStartSpec, build_warm_start

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "build-warm-start.py"))
    root = tmp_path_factory.mktemp("lab")
    with pytest.MonkeyPatch.context() as mp:  # its demo cache goes to the session's temp dir, not ~/.cache
        mp.setenv("UNIPOST_CACHE", str(root / "cache"))
        build_warm_start(root / "tiny-lab", WarmStartSpec(**script["QUICK"]), progress=False)
    return str(root / "tiny-lab")


@pytest.fixture()
def tiny_model(tokenizer):
    from unipost.models import build_tiny_qwen3

    return build_tiny_qwen3(len(tokenizer), seed=0)


_EMBEDDED_ENV_MODULES = {"test_trainer", "test_resume", "test_main_job", "test_pretrained"}


def pytest_collection_modifyitems(config, items):
    """Tests that run agents in the embedded environment need the bubblewrap sandbox.

    scripts/setup-venv.sh installs it; where it cannot (no root, no apt), these tests are skipped
    with the reason instead of failing or executing a model's commands unsandboxed.
    """
    from unipost.envs.embedded import bwrap_available

    if bwrap_available():
        return
    skip = pytest.mark.skip(reason="the embedded environment needs bubblewrap (apt-get install bubblewrap)")
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in _EMBEDDED_ENV_MODULES:
            item.add_marker(skip)
