"""Was the machine quiet while we measured? What every benchmark records beside its figures.

Why: on a small CPU box other jobs distort timings ~5x and ratios 2-3x (torch's threads oversubscribe the
cores), so a figure without the machine's state is not evidence. The 1-minute load average alone cannot
tell our own work from other jobs' (it counts us too, and lags by a minute), so :class:`QuietMonitor`
measures what *others* used: the CPU time the whole machine spent busy (``/proc/stat``) minus the CPU
time of this process and its waited-for children (``getrusage``), over the measured interval. A row is
marked busy when others used more than ``BUSY_CORES`` cores on average.

    from unipost.machine import QuietMonitor, machine_state
    with QuietMonitor() as quiet:
        run_the_thing()
    row.update(quiet.record())        # {"load1": .., "others_cores": .., "busy": .., "threads": ..}

Linux only for ``others_cores`` (elsewhere it is ``None`` and rows are never marked busy by it; the
load average still is recorded).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

BUSY_CORES = 0.25  # others' mean CPU use (cores) above which a measurement is marked busy
BUSY_LOAD1 = 1.0  # 1-minute load average before a run above which the machine is called busy


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


def machine_state() -> dict[str, Any]:
    """The machine now: load averages, CPU count, torch threads, and whether it looks idle by load."""
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        load1 = load5 = load15 = float("nan")
    return {
        "load1": round(load1, 2),
        "load5": round(load5, 2),
        "load15": round(load15, 2),
        "cpus": os.cpu_count(),
        "threads": torch_threads(),
        "idle_by_load": bool(load1 <= BUSY_LOAD1),
    }


class QuietMonitor:
    """Context manager: how much CPU *other* processes used while the block ran.

    ``record()`` gives the load average before and after, the others' mean cores, the wall time, the
    torch thread count and ``busy`` (others above ``BUSY_CORES``, or load above ``BUSY_LOAD1`` before
    the block started). Child processes count as ours only once waited for (``subprocess.run`` does).
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
        self._busy0 = _busy_seconds() or 0.0
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._wall = time.perf_counter() - self._t0
        busy1 = _busy_seconds()
        own = _own_seconds() - self._own0
        if busy1 is not None and self._wall > 0:
            self._others = max(0.0, (busy1 - self._busy0 - own) / self._wall)
        self.after = machine_state()

    @property
    def busy(self) -> bool:
        others_busy = self._others is not None and self._others > BUSY_CORES
        return bool(others_busy or not self.before.get("idle_by_load", True))

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


def header_line(state: dict[str, Any] | None = None) -> str:
    """One line for a results table's header: load, CPUs, threads."""
    s = state or machine_state()
    return (
        f"load average {s['load1']}/{s['load5']}/{s['load15']} (1/5/15 min), {s['cpus']} CPUs, "
        f"torch threads {s['threads']}" + ("" if s["idle_by_load"] else "  [BUSY MACHINE]")
    )
