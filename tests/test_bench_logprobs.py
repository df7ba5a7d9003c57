"""benchmarks/bench_logprobs.py: its tiny ``--dry-run`` path runs end to end and records the machine state.

Runs the real script (fresh worker processes per implementation, as in a recorded run) on tiny shapes and
checks what it writes: one row per implementation, numbers that agree with the fp64 reference, and the
load / threads / busy columns every recorded figure must carry (issue 14, item 0). No timing is asserted.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_logprobs.py"
HYGIENE = ("load1_before", "load1_after", "others_cores", "threads", "busy")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_logprobs")
    impls = "naive,ours,ours-eager,ours-3gemm"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--impls", impls, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_dry_run_writes_one_ok_row_per_impl_with_load_columns(dry_run):
    out, _ = dry_run
    rows = list(csv.DictReader((out / "logprobs-dry-run.csv").open()))
    assert [r["impl"] for r in rows] == ["naive", "ours", "ours-eager", "ours-3gemm"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["dtype"] == "fp32" and r["device"] == "cpu"
        assert all(r[c] != "" for c in HYGIENE if c != "others_cores"), r
        assert r["busy"] in ("True", "False") and int(r["threads"]) >= 1
        assert float(r["total_s"]) > 0 and float(r["peak_mib"]) >= 0
        assert float(r["err_logp"]) < 1e-4 and float(r["err_grad"]) < 1e-4, "disagrees with the fp64 truth"
    assert float(rows[0]["time_vs_naive"]) == 1.0
    doc = json.loads((out / "logprobs-dry-run.json").read_text())
    assert any("load average" in line for line in doc["header"]), doc["header"]
    md = (out / "logprobs-dry-run.md").read_text()
    assert "load before/after" in md and "| fp32 | 96 | 512 | ours |" in md


def test_missing_peer_or_unusable_impl_is_a_row_not_a_crash(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_logprobs as bench
    finally:
        sys.path.pop(0)
    args = bench.parse_args(["--dry-run", "--out", str(tmp_path)])
    assert "skipped" in bench._skip_reason("ours-triton", 4096, 32768, "fp32", "cpu", args)
    args.mem_limit_gib = 1.0
    assert "memory" in bench._skip_reason("naive", 16384, 152064, "fp32", "cpu", args)
    assert bench._skip_reason("ours", 16384, 152064, "fp32", "cpu", args) is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "naive,nonsense"])


@pytest.mark.parametrize("impl", ["gemm3", "gemm4", "gemm3-tiles"])
def test_gemm_floors_do_exactly_the_matrix_work_they_claim(impl):
    """The floor rows must do every tile's GEMMs once: their gradients equal the full-size products.

    (A tile skipped or counted twice would make the floor, and every conclusion drawn from it, wrong.)
    """
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_logprobs as bench
    finally:
        sys.path.pop(0)
    fn, _ = bench._impl(impl, "cpu")
    for n, v in ((300, 5000), (5000, 300)):  # both loop orders (rows outer and columns outer)
        g = torch.Generator().manual_seed(n)
        h = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(v, 16, generator=g, dtype=torch.float64, requires_grad=True)
        fn(h, w, None).sum().backward()
        z = h.detach() @ w.detach().T
        torch.testing.assert_close(h.grad, z @ w.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(w.grad, z.T @ h.detach(), rtol=1e-10, atol=1e-10)


def test_paired_dry_run_times_every_impl_each_round_and_ratios_against_the_ref(tmp_path):
    """bench_logprobs_paired: one process per case, every impl once per round, ratios per round."""
    paired = SCRIPT.parent / "bench_logprobs_paired.py"
    cmd = [sys.executable, str(paired), "--dry-run", "--impls", "ours,ours-3gemm,gemm4", "--ref", "ours"]
    cmd += ["--pairs", "ours/gemm4"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "logprobs-paired-dry-run.json").read_text())
    (case,) = doc["cases"]
    assert case["status"] == "ok" and doc["ref"] == "ours"
    assert [len(case["times"][i]) for i in ("ours", "ours-3gemm", "gemm4")] == [2, 2, 2]
    s = case["summary"]["ours-3gemm"]
    assert s["ratio_lo"] <= s["ratio"] <= s["ratio_hi"] and 0 <= s["faster_rounds"] <= 2
    pair = case["pairs"]["ours/gemm4"]  # from the same rounds: ours' times over gemm4's
    ratios = sorted(a / b for a, b in zip(case["times"]["ours"], case["times"]["gemm4"], strict=True))
    assert pair["rounds"] == 2 and abs(pair["ratio"] - (ratios[0] + ratios[1]) / 2) < 1e-3
    assert "| ours/gemm4 |" in (tmp_path / "logprobs-paired-dry-run.md").read_text()
    assert "ratio" not in case["summary"]["ours"]
    assert all(e < 1e-4 for e in case["checks"]["ours-3gemm"]), "disagrees with the fp64 truth"
    assert "ABBA" in doc["header"][0] and "load average" in doc["header"][1]


def test_paired_summary_pairs_rounds():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_logprobs_paired as paired
    finally:
        sys.path.pop(0)
    # a machine that slows 2x over the run: per-round ratios stay 0.9 whatever the drift
    times = {"a": [0.9, 1.35, 1.8], "b": [1.0, 1.5, 2.0]}
    s = paired.paired_summary(times, "b")["a"]
    assert s["ratio"] == 0.9 and s["faster_rounds"] == 3 and s["ratio_lo"] == s["ratio_hi"] == 0.9
    # the median's interval is distribution-free order statistics with its exact coverage
    assert paired.median_interval([float(i) for i in range(1, 11)]) == (2.0, 9.0, 0.978515625)
    with pytest.raises(SystemExit):  # an odd count would weigh one order more
        paired.parse_args(["--impls", "ours,cce", "--rounds", "9"])


def test_paired_pairs_must_name_listed_impls():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_logprobs_paired as paired
    finally:
        sys.path.pop(0)
    args = paired.parse_args(["--impls", "ours,gemm4,cce", "--pairs", "ours/gemm4"])
    assert args.pairs == [("ours", "gemm4")]
    for bad in ("ours/gemm4", "ours", "ours/cce/x"):
        with pytest.raises(SystemExit):
            paired.parse_args(["--impls", "ours,cce", "--pairs", bad])
