"""Timing one piece of work on a device: warm-up, repeats, median and spread.

CPU ops are synchronous; on CUDA the clock only means something after a synchronize, so the
timer synchronizes before starting and before stopping each repeat. Measurements during
which other processes used the CPUs are taken again (services/profiler/contention.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.profiler.contention import ContentionMonitor


@dataclass(frozen=True)
class TimingStats:
    median_s: float
    p10_s: float
    p90_s: float
    num_repeats: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the measurement was."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def scaled(self, factor: float) -> TimingStats:
        return TimingStats(
            self.median_s * factor, self.p10_s * factor, self.p90_s * factor, self.num_repeats
        )


def stats_of(samples_s: list[float]) -> TimingStats:
    if not samples_s:
        raise ValueError("no timing samples")
    ordered = sorted(samples_s)
    return TimingStats(
        median_s=statistics.median(ordered),
        p10_s=_quantile(ordered, 0.1),
        p90_s=_quantile(ordered, 0.9),
        num_repeats=len(ordered),
    )


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted samples."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Timer:
    """Times work on a device; re-measures (up to `max_retries` times, after a pause) when
    other processes were busy on the CPUs, keeping the attempt with the lowest median."""

    def __init__(
        self,
        device: torch.device,
        num_warmup: int,
        num_repeats: int,
        *,
        max_retries: int = 3,
        retry_pause_s: float = 0.5,
        monitor: ContentionMonitor | None = None,
    ) -> None:
        self.device = device
        self.num_warmup = num_warmup
        self.num_repeats = num_repeats
        self.max_retries = max_retries
        self.retry_pause_s = retry_pause_s
        self.monitor = monitor if monitor is not None else ContentionMonitor()
        self.num_measurements = 0
        self.num_retries = 0
        self.num_contended = 0  # kept although every attempt saw contention

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, work: Callable[[], object], divide_by: int = 1) -> TimingStats:
        """Time `work()`; `divide_by` turns a loop over several layers into a per-layer time."""
        self.num_measurements += 1
        best: TimingStats | None = None
        for attempt in range(self.max_retries + 1):
            before = self.monitor.snapshot()
            start = time.perf_counter()
            stats = self._samples(work, divide_by)
            contended = self.monitor.contended(before, time.perf_counter() - start)
            if best is None or stats.median_s < best.median_s:
                best = stats
            if not contended:
                return best
            if attempt < self.max_retries:
                self.num_retries += 1
                time.sleep(self.retry_pause_s * (attempt + 1))
        self.num_contended += 1
        assert best is not None
        return best

    def _samples(self, work: Callable[[], object], divide_by: int) -> TimingStats:
        with torch.inference_mode():
            for _ in range(self.num_warmup):
                work()
            samples_s = []
            for _ in range(self.num_repeats):
                self._sync()
                start = time.perf_counter()
                work()
                self._sync()
                samples_s.append((time.perf_counter() - start) / divide_by)
        return stats_of(samples_s)


class Series:
    """Timings keyed by grid point: one size (a curve) or (batch size, size) (a surface)."""

    def __init__(self) -> None:
        self._points: dict[tuple[int, ...], TimingStats] = {}

    def add(self, point: tuple[int, ...], stats: TimingStats) -> None:
        self._points[point] = stats

    def __len__(self) -> int:
        return len(self._points)

    def curve_json(self) -> dict[str, list[float] | list[int]]:
        """{"sizes", "median_s", "p10_s", "p90_s"} over the points (size,)."""
        return _series_json(sorted((point[-1], stats) for point, stats in self._points.items()))

    def surface_json(self) -> dict[str, list[dict[str, object]]]:
        """{"rows": [{"batch_size", "sizes", "median_s", ...}]} over points (batch, size)."""
        rows: dict[int, list[tuple[int, TimingStats]]] = {}
        for (batch, size), stats in self._points.items():
            rows.setdefault(batch, []).append((size, stats))
        return {
            "rows": [
                {"batch_size": batch, **_series_json(sorted(points))}
                for batch, points in sorted(rows.items())
            ]
        }


def _series_json(points: list[tuple[int, TimingStats]]) -> dict[str, list[float] | list[int]]:
    return {
        "sizes": [size for size, _ in points],
        "median_s": [stats.median_s for _, stats in points],
        "p10_s": [stats.p10_s for _, stats in points],
        "p90_s": [stats.p90_s for _, stats in points],
    }
