"""unipost.machine: what benchmarks record beside their figures (load, threads, others' CPU use)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import unipost.machine as m
from unipost.machine import QuietMonitor, header_line, machine_state


def test_state_and_record_are_json_with_the_documented_columns():
    state = machine_state()
    assert {"load1", "load5", "load15", "cpus", "cpu_model", "threads", "idle_by_load"} <= set(state)
    assert isinstance(state["cpu_model"], str) and state["cpu_model"]
    with QuietMonitor() as quiet:
        pass
    rec = quiet.record()
    assert set(rec) == {"load1_before", "load1_after", "others_cores", "threads", "busy"}
    json.dumps(rec)
    assert "CPUs" in header_line(state)
    assert state["cpu_model"] in header_line(state)  # tables from different processors stay apart


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


def _fake_clock(monkeypatch, *, machine: list[float], own: list[float], wall: float, load1: float = 0.1):
    """Replay /proc/stat busy seconds, our own CPU seconds and the wall clock (enter, exit); fixed load."""
    machine_it, own_it, wall_it = iter(machine), iter(own), iter([1000.0, 1000.0 + wall])
    monkeypatch.setattr(m, "_busy_seconds", lambda: next(machine_it))
    monkeypatch.setattr(m, "_own_seconds", lambda: next(own_it))
    monkeypatch.setattr(m.time, "perf_counter", lambda: next(wall_it))
    monkeypatch.setattr(m.os, "getloadavg", lambda: (load1, load1, load1))


def test_our_own_earlier_rows_in_the_load_average_do_not_mark_the_next_row_busy(monkeypatch):
    """Row 2 of a benchmark starts with load ~2 from row 1 (ours); others used nothing: not busy."""
    _fake_clock(monkeypatch, machine=[100.0, 101.6], own=[50.0, 51.6], wall=0.8, load1=2.0)
    with QuietMonitor() as quiet:
        pass
    rec = quiet.record()
    assert rec["others_cores"] == 0.0
    assert rec["load1_before"] == 2.0
    assert not rec["busy"]
    assert not quiet.warn_if_busy()


def test_a_block_shorter_than_the_tick_resolution_is_not_called_busy_from_one_tick(monkeypatch):
    """A 1 ms block that sees one 10 ms /proc/stat tick is not '10 cores of others': not measured."""
    _fake_clock(monkeypatch, machine=[100.0, 100.01], own=[50.0, 50.0], wall=0.001)
    with QuietMonitor() as quiet:
        pass
    assert quiet.wall_s < m.MIN_WINDOW_S
    assert quiet.record()["others_cores"] is None
    assert not quiet.busy


def test_without_a_measure_of_others_the_load_before_decides(monkeypatch):
    _fake_clock(monkeypatch, machine=[100.0, 100.0], own=[50.0, 50.0], wall=0.001, load1=3.0)
    with QuietMonitor() as quiet:
        pass
    assert quiet.record()["others_cores"] is None and quiet.busy


def test_no_load_average_is_unknown_not_busy(monkeypatch):
    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr(m, "_busy_seconds", lambda: None)
    monkeypatch.setattr(m.os, "getloadavg", no_load)
    state = machine_state()
    assert state["idle_by_load"] is None
    assert "BUSY" not in header_line(state)
    with QuietMonitor() as quiet:
        pass
    rec = quiet.record()
    assert rec["others_cores"] is None and not rec["busy"]
    json.dumps(rec)  # NaN load is still serialisable by json (as NaN)


def test_others_over_the_threshold_mark_the_row_and_warn(monkeypatch, capsys):
    _fake_clock(monkeypatch, machine=[100.0, 102.0], own=[50.0, 51.0], wall=1.0)
    with QuietMonitor() as quiet:
        pass
    rec = quiet.record()
    assert rec["others_cores"] == 1.0  # we used one core, the machine two
    assert rec["busy"] and quiet.warn_if_busy("row 1")
    assert "row 1 taken on a busy machine" in capsys.readouterr().err


def test_hygiene_cells_and_note_render_the_busy_marker_the_same_everywhere():
    quiet = {"load1_before": 0.31, "load1_after": 1.9, "others_cores": 0.02, "threads": 2, "busy": False}
    busy = {"load1_before": 4.0, "load1_after": 5.5, "others_cores": 1.3, "threads": 2, "busy": True}
    unmeasured = {"load1_before": 0.2, "load1_after": None, "others_cores": None, "threads": None}
    unmeasured["busy"] = False
    assert len(m.HYGIENE_HEADERS) == len(m.hygiene_cells(quiet)) == 4
    assert m.hygiene_cells(quiet) == ["0.31 / 1.90", "0.02", "2", "no"]
    assert m.hygiene_cells(busy)[-1] == m.BUSY_MARK == "BUSY"
    assert m.hygiene_cells(unmeasured) == ["0.20 / n/a", "n/a", "n/a", "no"]
    state = {"cpus": 2}
    assert m.hygiene_note([quiet, quiet], state).startswith("Machine quiet for all 2 rows")
    note = m.hygiene_note([quiet, busy, quiet], state)
    assert "1 of 3 rows marked BUSY" in note and "rows 2:" in note and "up to 1.30 cores" in note
    # a rich table takes the same headers and cells
    from rich.table import Table

    table = Table()
    for h in ("figure", *m.HYGIENE_HEADERS):
        table.add_column(h)
    table.add_row("1.0", *m.hygiene_cells(busy))
    assert table.row_count == 1


def test_combine_records_busy_if_any_block_was():
    a = {"load1_before": 0.1, "load1_after": 0.9, "others_cores": 0.05, "threads": 2, "busy": False}
    b = {"load1_before": 0.9, "load1_after": 1.7, "others_cores": 0.6, "threads": 2, "busy": True}
    c = m.combine_records([a, b])
    assert c == {"load1_before": 0.1, "load1_after": 1.7, "others_cores": 0.6, "threads": 2, "busy": True}
    assert not m.combine_records([a, a])["busy"]
    with pytest.raises(ValueError):
        m.combine_records([])


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n", "AMD EPYC 7B13"),
        (
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n\nprocessor\t: 1\nmodel name\t: other\n",
            "Intel(R) Xeon(R)",
        ),
        ("processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n", "POWER9 (raw), altivec supported"),
        ("processor\t: 0\nmodel name\t: ARMv7 rev 4 (v7l)\nModel\t\t: Raspberry Pi 3\n", "ARMv7 rev 4 (v7l)"),
    ],
)
def test_cpu_model_reads_each_architectures_cpuinfo(cpuinfo, expected):
    assert m.cpu_model(cpuinfo) == expected


def test_cpu_model_tells_arm64_cores_apart():
    """ARM64's /proc/cpuinfo has no model name: two different cores must not get one label."""
    neoverse_v1 = "processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    neoverse_n1 = neoverse_v1.replace("0xd40", "0xd0c")
    a, b = m.cpu_model(neoverse_v1), m.cpu_model(neoverse_n1)
    assert a != b and "0xd40" in a and "0xd0c" in b


def test_cpu_model_without_cpuinfo_still_names_something():
    assert isinstance(m.cpu_model(""), str) and m.cpu_model("")
