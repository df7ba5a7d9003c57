"""scripts/gpu-check.sh: its CPU dry run end to end, and the step runner's timeouts, failures and budget.

The GPU run itself needs a lent H200 (benchmarks/README.md, "GPU check"); here the same script runs with
``--dry-run``: the steps that need CUDA are reported as ``skipped: no CUDA`` (their test ids checked to
exist), the bench runs its CPU dry run, and one results file (json + md + log) is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402  (scripts/ is not a package)

EXPECTED_STEPS = [
    "wheels", "env", "triton", "bench:naive", "bench:ours-triton", "bench:liger", "bench:cce",
    "bench:cpu-dry", "flex",
]  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    report = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").exists() else None
    return proc, out, report


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the CPU dry run (on a GPU the steps really run)"
)
def test_dry_run_writes_one_results_file(dry_run):
    proc, out, report = dry_run
    assert report is not None, f"no gpu-check.json:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]
    assert report["mode"] == "dry-run" and report["over_budget"] is False
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == EXPECTED_STEPS
    env = report["env"]
    assert steps["env"]["status"] == "ok" and env["cuda_available"] is False
    assert env["versions"]["torch"] and env["versions"]["transformers"]
    assert env["unipost"].endswith("model.py")
    for name in ("triton", "flex", "bench:naive", "bench:ours-triton", "bench:liger", "bench:cce"):
        assert steps[name]["status"] == "skipped: no CUDA", (name, steps[name])
    assert steps["wheels"]["status"].startswith("skipped")
    bench = steps["bench:cpu-dry"]
    assert bench["status"] == "ok", bench
    impls = {gpu_check._row_impl(r) for r in bench["rows"]}
    assert {"naive", "ours"} <= impls, bench["rows"]
    assert all(r["status"] == "ok" for r in bench["rows"])
    for ran in ("env", "bench:cpu-dry"):
        assert steps[ran]["seconds"] > 0 and steps[ran]["returncode"] == 0
    assert report["summary"] == {"ok": 2, "failed": 0, "skipped": 7}
    md = (out / "gpu-check.md").read_text()
    assert "| triton |" in md and "skipped: no CUDA" in md and "| naive | cpu |" in md
    log = (out / "gpu-check.log").read_text()
    assert "===== env =====" in log and "GPU_CHECK_ENV" in log and "===== bench_cpu-dry =====" in log


def test_a_step_past_its_timeout_is_killed_and_the_next_runs(tmp_path):
    """The whole process group is killed (a child that outlives its parent too), and the run goes on."""
    sleeper = gpu_check.Step("slow", "sleeps", ["bash", "-c", "sleep 61.37 & sleep 61.37"], 60)
    started = time.monotonic()
    result = gpu_check.run_step(sleeper, 1.0, tmp_path, dict(os.environ), cuda=False)
    assert result.status.startswith("timeout after") and result.failed
    assert time.monotonic() - started < 30
    left = subprocess.run(["pgrep", "-f", "^sleep 61.37$"], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the killed step still run: {left}"
    failing = gpu_check.Step("bad", "exits 3", ["bash", "-c", "echo boom; exit 3"], 30)
    result = gpu_check.run_step(failing, 30, tmp_path, dict(os.environ), cuda=False)
    assert result.status == "failed: exit 3" and result.returncode == 3 and "boom" in result.log_tail


def test_pytest_results_are_read_from_junit(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no CUDA here')\n"
        "def test_skip(): pass\n"
    )
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tests)]
    step = gpu_check.Step("sample", "pytest", argv, 120, kind="pytest")
    result = gpu_check.run_step(step, 120, tmp_path, dict(os.environ), cuda=True)
    assert result.tests == {"passed": 1, "failed": 1, "skipped": 1}
    assert result.status == "failed: 1 of 3 tests" and result.failed
    assert (
        len(result.failures) == 1
        and "test_bad" in result.failures[0]
        and "one is not two" in result.failures[0]
    )
    # all skipped: "skipped: no CUDA" on a machine without CUDA, the skip reason with it
    assert gpu_check.pytest_status(0, {"passed": 0, "failed": 0, "skipped": 2}, ["x"], cuda=False) == (
        gpu_check.NO_CUDA
    )
    assert gpu_check.pytest_status(0, {"passed": 0, "failed": 0, "skipped": 2}, ["why"], cuda=True) == (
        "skipped: why"
    )
    assert gpu_check.pytest_status(5, {"passed": 0, "failed": 0, "skipped": 0}, [], cuda=True).startswith(
        "failed: no tests ran"
    )


def test_bench_rows_decide_the_bench_status():
    ok = {"impl": "naive", "status": "ok"}
    missing = {"impl": "liger", "status": "unavailable: liger_kernel is not installed"}
    assert gpu_check.bench_status(0, [ok]) == "ok"
    assert gpu_check.bench_status(0, [missing]).startswith("unavailable")
    assert (
        gpu_check.bench_status(0, [{"impl": "cce", "status": "error: CUDA OOM"}]) == "failed: error: CUDA OOM"
    )
    assert gpu_check.bench_status(2, []) == "failed: bench exit 2"
    assert gpu_check.bench_status(0, []) == "failed: no result rows"


def test_budget_skips_steps_and_renamed_tests_fail(tmp_path, monkeypatch):
    """With less budget left than a step's minimum it is skipped (reported), never started."""
    rc = gpu_check.main(["--dry-run", "--budget", "8", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = {s["name"]: s["status"] for s in report["steps"]}
    assert steps["env"].startswith("skipped: budget") and steps["bench:cpu-dry"].startswith("skipped: budget")
    assert rc == 0 and all(s.startswith("skipped") for s in steps.values()), steps
    assert gpu_check.missing_tests(["x", "tests/test_packing.py::test_pack_equals_separate_cuda_flex"]) == []
    gone = "tests/test_packing.py::test_that_does_not_exist"
    assert gpu_check.missing_tests([gone]) == [gone]
