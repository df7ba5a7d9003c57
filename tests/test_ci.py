"""CI's time bound: the whole `.ci/run` stays within CI's 90-minute hard limit, opt-in jobs included (the
default suite's cap plus every job's declared minutes fit in the budget, so each job gets its whole slot),
and an opt-in job that does not finish in its slot is reported SKIP, never a failure (a slow package index
must not block every landing); a job whose tests fail still fails CI. The job runner runs here on fake
jobs."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _job(folder: Path, name: str, minutes: int, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n# ci-minutes: {minutes}\n{body}\n")
    return path


def _run(jobs: list[Path], *, budget_s: int, start: float | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "UNIPOST_CI_JOBS": " ".join(str(j) for j in jobs),
        "UNIPOST_CI_BUDGET_S": str(budget_s),
        "UNIPOST_CI_START": str(int(start if start is not None else time.time())),
        "UNIPOST_CI_MINUTE_S": "1",  # a declared "minute" is one second here
        "UNIPOST_CI_MIN_SLOT_S": "1",
    }
    script = ROOT / "scripts" / "run-optional-jobs.sh"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)


def test_a_job_past_its_slot_is_a_skip_and_a_failing_job_fails(tmp_path):
    slow = _job(tmp_path, "10-slow.sh", 1, "sleep 30")
    ok = _job(tmp_path, "20-ok.sh", 5, "echo ran ok")
    t0 = time.time()
    out = _run([slow, ok], budget_s=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"SKIP .*10-slow.sh: did not finish in its 1s slot", out.stdout)
    assert "ran ok" in out.stdout
    assert time.time() - t0 < 25, "the slow job was not stopped at the end of its slot"

    failing = _job(tmp_path, "30-fail.sh", 5, "exit 3")
    out = _run([failing, ok], budget_s=600)
    assert out.returncode == 1 and "FAIL" in out.stdout and "ran ok" in out.stdout


def test_a_job_gets_at_most_what_is_left_of_the_budget(tmp_path):
    long = _job(tmp_path, "10-long.sh", 100, "sleep 30")
    after = _job(tmp_path, "20-after.sh", 5, "echo should not run")
    t0 = time.time()
    out = _run([long, after], budget_s=3)  # 100 declared "minutes", 3 s of budget
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SKIP" in out.stdout and "should not run" not in out.stdout
    assert time.time() - t0 < 25
    spent = _run([after], budget_s=10, start=time.time() - 60)  # the budget is already used up
    assert "SKIP" in spent.stdout and "should not run" not in spent.stdout


def test_ci_run_is_bounded_by_the_90_minute_limit_and_every_job_gets_its_whole_slot():
    ci = (ROOT / ".ci" / "run").read_text()
    budget = int(re.search(r"UNIPOST_CI_BUDGET_S:-(\d+)", ci).group(1))
    suite = int(re.search(r"UNIPOST_CI_SUITE_S:-(\d+)", ci).group(1))
    runner = (ROOT / "scripts" / "run-optional-jobs.sh").read_text()
    assert int(re.search(r"UNIPOST_CI_BUDGET_S:-(\d+)", runner).group(1)) == budget
    # the budget, plus the kill grace periods (30 s for the suite, 10 s per job), inside 90 minutes
    jobs = sorted((ROOT / "scripts" / "ci-optional").glob("*.sh"))
    assert budget + 30 + 10 * len(jobs) <= 90 * 60 - 60
    assert re.search(r'timeout --kill-after=30 "\$suite" bash scripts/run-tests.sh', ci)
    assert "scripts/run-optional-jobs.sh" in ci
    minutes = {}
    for job in jobs:
        declared = re.search(r"^# ci-minutes: (\d+)$", job.read_text(), flags=re.M)
        assert declared, f"{job} declares no minutes"
        minutes[job.name] = int(declared.group(1))
    assert suite + 60 * sum(minutes.values()) <= budget, (suite, minutes, budget)
