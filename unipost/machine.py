"""Was the machine quiet while we measured? What every benchmark records beside its figures.

Why: on a small CPU box other jobs distort timings ~5x and ratios 2-3x (torch's threads oversubscribe the
cores), so a figure without the machine's state is not evidence. The 1-minute load average alone cannot
tell our own work from other jobs' (it counts us too, and lags by a minute), so :class:`QuietMonitor`
measures what *others* used: the CPU time the whole machine spent busy (``/proc/stat``, steal time
included) minus the CPU time of this process and its waited-for children (``getrusage``), over the
measured interval. A row is marked busy when others used more than ``BUSY_CORES`` cores on average.

    from unipost.machine import QuietMonitor, hygiene_cells, HYGIENE_HEADERS, hygiene_note
    with QuietMonitor() as quiet:
        run_the_thing()
    quiet.warn_if_busy("row 3")       # stderr warning when busy
    row.update(quiet.record())        # {"load1_before", "load1_after", "others_cores", "threads", "busy"}
    cells += hygiene_cells(row)       # the same four columns in rich tables and markdown
    md.append(hygiene_note(rows))     # one line under the table: quiet, or which rows are BUSY

The load average is recorded but decides ``busy`` only where others' use cannot be measured (not
Linux, or a block shorter than ``MIN_WINDOW_S``, below which ``/proc/stat``'s 10 ms ticks make the
figure noise): before the second row of a benchmark it mostly counts our own first row.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BUSY_CORES = 0.25  # others' mean CPU use (cores) above which a measurement is marked busy
BUSY_LOAD1 = 1.0  # 1-minute load average before a run above which the machine is called busy
MIN_WINDOW_S = 0.5  # shorter blocks: others' use is not measured (tick resolution), load decides
BUSY_MARK = "BUSY"  # the marker in the ``busy`` column (rich and markdown alike)
QUIET_MARK = "no"
HYGIENE_HEADERS = ("load1 before/after", "others' cores", "threads", "busy")


def _busy_seconds() -> float | None:
    """Seconds of CPU time the whole machine has spent not idle since boot (all cores), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process plus its children that have been waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def torch_threads() -> int | None:
    """torch's intra-op thread count, if torch is already imported (never imports it)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The processor's model name, or "unknown".

    Why: machines of one "kind" differ. The same fused-loss row took 8.2 s on one 2-core box and 5.2 s on
    another, which moved a ratio against a memory-bound baseline from 1.29x to 0.91x; a table that does
    not name its processor cannot be compared with another table.

    Linux: ``/proc/cpuinfo`` (``cpuinfo`` overrides its text): x86's ``model name``, MIPS's ``cpu model``,
    POWER's ``cpu``, a board's ``Model``; ARM64 names no model there, so its implementer and part ids
    (e.g. ``ARM implementer 0x41 part 0xd40``, a Neoverse V1) tell cores apart. macOS: ``sysctl``'s
    brand string. Elsewhere ``platform.processor()``.
    """
    if cpuinfo is None:
        return _this_cpu_model()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "cpu model", "cpu", "Model"):
        if key in fields:
            return fields[key]
    if "CPU implementer" in fields and "CPU part" in fields:
        return f"ARM implementer {fields['CPU implementer']} part {fields['CPU part']}"
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def _this_cpu_model() -> str:
    """This machine's :func:`cpu_model`, read once (QuietMonitor asks before and after every timed block)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return cpu_model(cpuinfo)


def machine_state() -> dict[str, Any]:
    """The machine now: load averages, CPU count and model, torch threads, whether it looks idle by load.

    ``idle_by_load`` is None where the load average is unavailable (it then never marks a row busy).
    """
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        load1 = load5 = load15 = float("nan")
    return {
        "load1": round(load1, 2),
        "load5": round(load5, 2),
        "load15": round(load15, 2),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "threads": torch_threads(),
        "idle_by_load": None if math.isnan(load1) else bool(load1 <= BUSY_LOAD1),
    }


class QuietMonitor:
    """Context manager: how much CPU *other* processes used while the block ran.

    ``record()`` gives the load average before and after, the others' mean cores (None when not
    measurable), the torch thread count and ``busy``: others above ``BUSY_CORES``; where others' use
    was not measured, the load average before the block above ``BUSY_LOAD1``. Child processes count as
    ours only once waited for (``subprocess.run`` does); an engine's worker processes that live on
    (vLLM's) count as others' while they run.
    """

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self._t0 = self._busy0 = self._own0 = 0.0
        self._wall = 0.0
        self._others: float | None = None

    def __enter__(self) -> QuietMonitor:
        self.before = machine_state()
        self._own0 = _own_seconds()
        busy0 = _busy_seconds()
        self._busy0 = busy0 if busy0 is not None else float("nan")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._wall = time.perf_counter() - self._t0
        busy1 = _busy_seconds()
        own = _own_seconds() - self._own0
        if busy1 is not None and not math.isnan(self._busy0) and self._wall >= MIN_WINDOW_S:
            self._others = max(0.0, (busy1 - self._busy0 - own) / self._wall)
        self.after = machine_state()

    @property
    def wall_s(self) -> float:
        """Seconds the block took."""
        return self._wall

    @property
    def busy(self) -> bool:
        if self._others is not None:
            return bool(self._others > BUSY_CORES)
        return self.before.get("idle_by_load") is False

    def record(self) -> dict[str, Any]:
        """Columns to put beside a figure (JSON-serialisable)."""
        return {
            "load1_before": self.before.get("load1"),
            "load1_after": self.after.get("load1"),
            "others_cores": None if self._others is None else round(self._others, 2),
            "threads": self.after.get("threads") or self.before.get("threads"),
            "busy": self.busy,
        }

    def warn_if_busy(self, what: str = "measurement") -> bool:
        """Print a warning to stderr when busy; returns ``busy`` (mark the row with it)."""
        if self.busy:
            print(
                f"WARNING: {what} taken on a busy machine (load1 {self.before.get('load1')} before, "
                f"others used {self.record()['others_cores']} cores): its times and ratios are not "
                "comparable with a quiet run",
                file=sys.stderr,
            )
        return self.busy


def combine_records(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One record for a figure measured over several blocks (e.g. a ratio of two timed runs).

    Load before from the first, after from the last; others' cores and threads the largest; busy if
    any block was.
    """
    recs = list(records)
    if not recs:
        raise ValueError("no records to combine")
    others = [r["others_cores"] for r in recs if r.get("others_cores") is not None]
    threads = [r["threads"] for r in recs if r.get("threads") is not None]
    return {
        "load1_before": recs[0].get("load1_before"),
        "load1_after": recs[-1].get("load1_after"),
        "others_cores": max(others) if others else None,
        "threads": max(threads) if threads else None,
        "busy": any(bool(r.get("busy")) for r in recs),
    }


def _num(x: Any, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def busy_marker(record: Mapping[str, Any]) -> str:
    """The ``busy`` column's cell: ``BUSY`` or ``no``."""
    return BUSY_MARK if record.get("busy") else QUIET_MARK


def hygiene_cells(record: Mapping[str, Any]) -> list[str]:
    """The cells under ``HYGIENE_HEADERS`` for one row (a ``record()``, or a row updated with one)."""
    return [
        f"{_num(record.get('load1_before'), '.2f')} / {_num(record.get('load1_after'), '.2f')}",
        _num(record.get("others_cores"), ".2f"),
        _num(record.get("threads"), "d"),
        busy_marker(record),
    ]


def hygiene_note(
    records: Iterable[Mapping[str, Any]], state: Mapping[str, Any] | None = None, what: str = "rows"
) -> str:
    """One line for under a table: every row quiet, or which rows are marked BUSY and why it matters.

    ``what`` names the records when they are not table rows (e.g. "shapes", "blocks").
    """
    recs = list(records)
    s = state or machine_state()
    others = [r["others_cores"] for r in recs if r.get("others_cores") is not None]
    loads = [x for r in recs for x in (r.get("load1_before"), r.get("load1_after")) if x is not None]
    threads = sorted({r["threads"] for r in recs if r.get("threads") is not None})
    busy = [i for i, r in enumerate(recs, 1) if r.get("busy")]
    facts = (
        f"{s['cpus']} CPUs, torch threads {'/'.join(map(str, threads)) or 'n/a'}, 1-minute load "
        + (f"{min(loads):.2f}-{max(loads):.2f}" if loads else "n/a")
        + ", others' CPU use up to "
        + (f"{max(others):.2f} cores" if others else "n/a (not measured)")
    )
    if not busy:
        return f"Machine quiet for all {len(recs)} {what} ({facts})."
    return (
        f"**{len(busy)} of {len(recs)} {what} marked {BUSY_MARK}** "
        f"({what} {', '.join(map(str, busy))}: other "
        f"processes used > {BUSY_CORES} cores, or where not measured the load was > {BUSY_LOAD1}; "
        f"{facts}): their times and ratios are not comparable with a quiet run."
    )


def header_line(state: dict[str, Any] | None = None) -> str:
    """One line for a results table's header: load, CPUs and their model, torch threads."""
    s = state or machine_state()
    return (
        f"load average {s['load1']}/{s['load5']}/{s['load15']} (1/5/15 min), {s['cpus']} CPUs"
        + (f" ({s['cpu_model']})" if s.get("cpu_model") else "")
        + f", torch threads {s['threads']}"
        + ("  [BUSY MACHINE]" if s["idle_by_load"] is False else "")
    )
