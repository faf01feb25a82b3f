"""Where the engine thread's time goes while it has work: inside forwards, or host work.

The engine marks the moment it starts working (leaving an idle wait) and, for every step
result it applies, charges the wall time since the previous mark to that step: the part
spent inside the step's forward (the model call, as the executor measured it) and the rest,
host work (planning, batching, sampling, applying the result, delivering tokens, and
waiting for the GIL or a core while the server streams). The totals, by step kind, feed the
worker's stats (GetStats, /metrics) and the profiler's fit of the serving overhead
(exegpt/serving_overhead.py). The busy fraction is forward time over wall time while busy.

The same totals are also kept by step size, in power-of-two bands of rows (`rows_band`): a
step's cost is not proportional to its rows (a fixed part per step weighs most on small
steps), and one total per kind hides how it grows. They are a diagnosis (GetStats
step_totals_by_rows; benchmarks/step_bands.py prices each band against the profile).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class StepTotals:
    """One step kind's totals since the engine started."""

    kind: str  # 'prefill' (chunks included) or 'decode'
    num_steps: int
    num_rows: int
    forward_s: float
    host_s: float
    min_rows: int = 0  # by rows: the band's smallest rows (`rows_band`); 0: every step
    # The executor's compute, uncapped: forward_s is capped at each step's share of the wall
    # time, which cuts short steps that overlapped others (a pipeline's); this is not.
    compute_s: float = 0.0


def rows_band(num_rows: int) -> int:
    """The smallest rows of the power-of-two band a step of `num_rows` is kept in (1, 2, 4,
    8, ...: the band of 4 holds steps of 4 to 7 rows)."""
    return 1 << (max(1, num_rows).bit_length() - 1)


@dataclass
class _Totals:
    num_steps: int = 0
    num_rows: int = 0
    forward_s: float = 0.0
    host_s: float = 0.0
    compute_s: float = 0.0

    def as_step_totals(self, kind: str, min_rows: int = 0) -> StepTotals:
        return StepTotals(
            kind, self.num_steps, self.num_rows, self.forward_s, self.host_s, min_rows,
            self.compute_s,
        )  # fmt: skip


class EngineClock:
    """Charges the engine thread's busy wall time to the steps it applies (thread-safe
    reads: the engine thread writes, stats readers copy under the lock)."""

    KINDS = ("prefill", "decode")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = {kind: _Totals() for kind in self.KINDS}
        self._by_rows: dict[tuple[str, int], _Totals] = {}
        self._mark_s: float | None = None

    def start_busy(self) -> None:
        """The engine has work from now on (a no-op while it already counts)."""
        if self._mark_s is None:
            self._mark_s = time.perf_counter()

    def stop_busy(self) -> None:
        """The engine is about to wait with nothing in flight: that time is not charged."""
        self._mark_s = None

    def charge(self, kind: str, num_rows: int, compute_s: float) -> float:
        """A step's result was applied: charge it the wall time since the last mark, of
        which its forward is the executor's `compute_s` capped at that wall time (compute_s
        itself is kept whole). Returns the host seconds charged (the wall time beyond its
        forward)."""
        now = time.perf_counter()
        compute_s = max(0.0, compute_s)
        wall_s = now - self._mark_s if self._mark_s is not None else compute_s
        self._mark_s = now
        forward_s = min(compute_s, wall_s) if wall_s > 0 else 0.0
        with self._lock:
            band = self._by_rows.setdefault((kind, rows_band(num_rows)), _Totals())
            for totals in (self._totals[kind], band):
                totals.num_steps += 1
                totals.num_rows += num_rows
                totals.forward_s += forward_s
                totals.host_s += wall_s - forward_s
                totals.compute_s += compute_s
        return wall_s - forward_s

    def totals(self) -> list[StepTotals]:
        with self._lock:
            return [t.as_step_totals(kind) for kind, t in self._totals.items()]

    def totals_by_rows(self) -> list[StepTotals]:
        """The totals per kind and band of rows, in kind then band order (bands with steps)."""
        with self._lock:
            return [
                t.as_step_totals(kind, band) for (kind, band), t in sorted(self._by_rows.items())
            ]


def busy_fraction(totals: list[StepTotals]) -> float:
    """Forward time over busy wall time (0 before the first step)."""
    forward_s = sum(t.forward_s for t in totals)
    wall_s = forward_s + sum(t.host_s for t in totals)
    return forward_s / wall_s if wall_s > 0 else 0.0
