"""Noticing other processes on our CPUs while we time something (Linux /proc).

Timings taken while another process runs on the same cores are wrong: a torch op whose
threads must all finish waits for the one the scheduler parked, often for a whole time
slice. The monitor compares the machine's busy CPU time (including hypervisor steal) with
our own process's over a measurement: the difference is someone else's. Where /proc is
missing the monitor reports no contention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (of "cpu ..." in /proc/stat)


@dataclass(frozen=True)
class CpuSnapshot:
    busy_ticks: int  # all CPUs, every process, plus steal
    own_ticks: int  # this process, all threads


def _read_snapshot() -> CpuSnapshot | None:
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:]]
    busy = sum(values[i] for i in _BUSY_FIELDS if i < len(values))
    return CpuSnapshot(busy, int(own[11]) + int(own[12]))  # utime, stime


@dataclass
class ContentionMonitor:
    """Flags a window in which other work used more than `max_foreign_cores` on average."""

    max_foreign_cores: float = 0.25
    min_foreign_ticks: int = 3  # counters tick at 100 Hz: ignore rounding noise

    def snapshot(self) -> CpuSnapshot | None:
        return _read_snapshot()

    def foreign_cores(self, before: CpuSnapshot | None, elapsed_s: float) -> float:
        """Average number of cores others kept busy since `before` (0 if unknown)."""
        after = _read_snapshot()
        if before is None or after is None or elapsed_s <= 0:
            return 0.0
        foreign = (after.busy_ticks - before.busy_ticks) - (after.own_ticks - before.own_ticks)
        if foreign < self.min_foreign_ticks:
            return 0.0
        return foreign / _TICKS_PER_S / elapsed_s

    def contended(self, before: CpuSnapshot | None, elapsed_s: float) -> bool:
        return self.foreign_cores(before, elapsed_s) > self.max_foreign_cores
