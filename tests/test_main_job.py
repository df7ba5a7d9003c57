"""The README's main job, in its seconds-long --quick form: both methods run, compare and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_main_job_quick(tmp_path):
    env = {**os.environ, "UNIPOST_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "unipost.cli", "main", "--quick", "--out-dir", str(tmp_path / "main")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "DAgger vs SFT" in out.stdout
    summary = json.loads((tmp_path / "main" / "summary.json").read_text())
    assert set(summary) == {"dagger", "sft"}
    for row in summary.values():
        assert 0.0 <= row["resolve_end"] <= 1.0 and row["reverse_kl_end"] >= 0.0
    assert (tmp_path / "main" / "comparison.png").stat().st_size > 10_000
