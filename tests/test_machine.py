"""unipost.machine: what benchmarks record beside their figures (load, threads, others' CPU use)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from unipost.machine import QuietMonitor, header_line, machine_state


def test_state_and_record_are_json_with_the_documented_columns():
    state = machine_state()
    assert {"load1", "load5", "load15", "cpus", "threads", "idle_by_load"} <= set(state)
    with QuietMonitor() as quiet:
        pass
    rec = quiet.record()
    assert set(rec) == {"load1_before", "load1_after", "others_cores", "threads", "busy"}
    json.dumps(rec)
    assert "CPUs" in header_line(state)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="others' CPU use is read from /proc/stat")
def test_a_process_we_do_not_wait_for_counts_as_someone_elses_load():
    """An unwaited child spinning for ~1 s is 'another job': the block must be marked busy."""
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass\n"
    with QuietMonitor() as quiet:
        child = subprocess.Popen([sys.executable, "-c", spin])
        time.sleep(1.2)
    child.wait()
    assert quiet.record()["others_cores"] > BUSY_FLOOR
    assert quiet.busy


BUSY_FLOOR = 0.3  # the spinner alone is ~0.8 cores over the block; 0.3 leaves room for a loaded machine
