"""Shared fixtures: a locally trained tokenizer and tiny random-init Qwen3 models (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (scripts/run-tests.sh runs ``-n auto``) the workers share the cores: each takes its
# share of threads, and so do the subprocesses its tests start (OMP_NUM_THREADS), so that two workers'
# torch thread pools do not oversubscribe two cores (spinning pools can be several times slower).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def tokenizer():
    from unipost.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def lab_assets(tmp_path_factory) -> str:
    """A ``--quick`` tiny-lab warm start (student, teacher, manifest), built once per test run.

    Built by running ``scripts/build-warm-start.py --quick`` itself, so the shipped build's script is
    exercised end to end (tests/test_lab.py checks the result works): tests pass it as
    ``tiny_config(assets=...)`` / ``--assets`` so they neither wait for nor depend on the shipped warm
    start, and share one build instead of one each. Under pytest-xdist the workers share it too: the
    first to take the lock builds it in the run's common temp folder, the others wait and read it.
    """
    import subprocess
    import sys
    from pathlib import Path

    from filelock import FileLock

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker else base) / "lab-quick"
    root.mkdir(exist_ok=True)
    out = root / "tiny-lab"
    failed = root / "build.failed"  # a failed build is reported to every worker, not retried by each
    with FileLock(str(root / "build.lock")):
        if failed.is_file():
            pytest.fail(f"the quick warm-start build failed (in another worker):\n{failed.read_text()}")
        if not (out / "manifest.json").is_file():
            script = Path(__file__).resolve().parents[1] / "scripts" / "build-warm-start.py"
            env = {**os.environ, "UNIPOST_CACHE": str(root / "cache")}  # demos: the run's temp, not ~/.cache
            run = subprocess.run(
                [sys.executable, str(script), "--quick", "--out", str(out)],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            if run.returncode != 0:
                failed.write_text(run.stdout[-2000:] + run.stderr[-2000:])
                pytest.fail(f"the quick warm-start build failed:\n{failed.read_text()}")
    return str(out)


@pytest.fixture()
def tiny_model(tokenizer):
    from unipost.models import build_tiny_qwen3

    return build_tiny_qwen3(len(tokenizer), seed=0)


_EMBEDDED_ENV_MODULES = {"test_trainer", "test_resume", "test_main_job", "test_pretrained"}


# The modules that take longest (wall seconds, measured with --durations on the 2-core machine), run
# first: pytest-xdist's --dist loadfile hands out whole modules in collection order (run-tests.sh passes
# --no-loadscope-reorder, which would otherwise sort modules by test count and leave these one-test,
# minute-long modules to the end, running alone). Order only; nothing depends on it.
_LONGEST_FIRST = (
    "test_main_job",
    "test_resume",
    "test_trainer",
    "test_bench_methods",
    "test_expert",
    "test_distributed",
    "test_white_box_teacher",
    "test_bench_logprobs",
    "test_triton_logprobs",
    "test_notebooks",
    "test_lab",
)


def _module(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


def pytest_collection_modifyitems(config, items):
    """Longest modules first (see ``_LONGEST_FIRST``); embedded-environment tests need bubblewrap.

    scripts/setup-venv.sh installs bubblewrap; where it cannot (no root, no apt), the tests that run
    agents in the embedded environment are skipped with the reason instead of failing or executing a
    model's commands unsandboxed.
    """
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: keeps order within a module
    from unipost.envs.embedded import bwrap_available

    if bwrap_available():
        return
    skip = pytest.mark.skip(reason="the embedded environment needs bubblewrap (apt-get install bubblewrap)")
    for item in items:
        if _module(item) in _EMBEDDED_ENV_MODULES:
            item.add_marker(skip)
