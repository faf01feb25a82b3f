"""Timing one piece of work on a device: warm-up, repeats, median and spread.

CPU ops are synchronous; on CUDA the clock only means something after a synchronize, so the
timer synchronizes before starting and before stopping each repeat. Measurements during
which other processes used the CPUs are taken again (services/profiler/measure/contention.py).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.profiler.measure.contention import ContentionMonitor


@dataclass(frozen=True)
class TimingStats:
    median_s: float
    p10_s: float
    p90_s: float
    num_repeats: int
    samples_s: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the measurement was."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def scaled(self, factor: float) -> TimingStats:
        return TimingStats(
            self.median_s * factor,
            self.p10_s * factor,
            self.p90_s * factor,
            self.num_repeats,
            tuple(s * factor for s in self.samples_s),
        )

    def plus(self, other: TimingStats) -> TimingStats:
        """Two pieces of work run one after the other (quantiles added: an upper bound)."""
        return TimingStats(
            self.median_s + other.median_s,
            self.p10_s + other.p10_s,
            self.p90_s + other.p90_s,
            min(self.num_repeats, other.num_repeats),
            tuple(a + b for a, b in zip(self.samples_s, other.samples_s, strict=False)),
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
        samples_s=tuple(ordered),
    )


def across_rounds(rounds: list[TimingStats]) -> TimingStats:
    """One point measured in several rounds spread over a run: the median of the rounds'
    medians (a round that fell into a slow spell of the machine does not move it), with the
    10th and 90th percentiles of all their samples."""
    if len(rounds) == 1:
        return rounds[0]
    median_s = statistics.median(r.median_s for r in rounds)
    samples = sorted(s for r in rounds for s in (r.samples_s or (r.median_s,)))
    return TimingStats(
        median_s=median_s,
        p10_s=min(median_s, _quantile(samples, 0.1)),
        p90_s=max(median_s, _quantile(samples, 0.9)),
        num_repeats=len(samples),
        samples_s=tuple(samples),
    )


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted samples."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


MIN_REPEATS = 3  # a median needs at least three samples


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The CPU's largest cache (Linux sysfs), or `default` where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=default)


class CacheFlusher:
    """Reads a buffer larger than the last-level cache, evicting what work left there.

    A forward of a model larger than the cache streams every layer's weights, the KV cache
    and the activations through it, so by the time a layer runs again little of it is still
    cached; a stack of a few layers that fits in the cache, timed in a loop, would find its
    weights cached on every repeat and look faster than in a forward. (A model that fits
    in the cache as a whole stays there between forwards: no flushing then.)
    """

    def __init__(self, num_bytes: int | None = None) -> None:
        num_bytes = num_bytes if num_bytes is not None else 2 * last_level_cache_bytes()
        self.num_bytes = num_bytes
        self._buffer = torch.ones(max(1, num_bytes // 4), dtype=torch.float32)

    def __call__(self) -> None:
        self._buffer.sum()


class Timer:
    """Times work on a device; re-measures (up to `max_retries` times, after a pause) when
    other processes were busy on the CPUs, keeping the attempt with the lowest median.

    With `max_time_s`, slow work stops early: warm-up after one call once that took longer
    than the budget, repeats once they took `max_time_s` (but never below MIN_REPEATS).

    With `min_sample_s`, one sample calls short work as often as it takes to last that long
    (timed from the last warm-up call) and reports the time per call. On a shared machine
    other tenants interrupt us every few milliseconds: the median of 1 ms samples misses
    most interruptions, the median of 10 ms forwards includes them, so timing both over the
    same span keeps a sum of short measurements comparable with one long forward.
    """

    def __init__(
        self,
        device: torch.device,
        num_warmup: int,
        num_repeats: int,
        *,
        max_time_s: float | None = None,
        min_sample_s: float = 0.0,
        before_repeat: Callable[[], object] | None = None,
        max_retries: int = 3,
        retry_pause_s: float = 0.5,
        monitor: ContentionMonitor | None = None,
    ) -> None:
        self.device = device
        self.num_warmup = num_warmup
        self.num_repeats = num_repeats
        self.max_time_s = max_time_s if max_time_s is not None else float("inf")
        self.min_sample_s = min_sample_s
        self.before_repeat = before_repeat  # untimed, e.g. a CacheFlusher: one call a sample
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

    def _calls_per_sample(self, call_s: float | None) -> int:
        if self.before_repeat is not None or not self.min_sample_s or not call_s:
            return 1
        return max(1, min(1000, math.ceil(self.min_sample_s / call_s)))

    def _samples(self, work: Callable[[], object], divide_by: int) -> TimingStats:
        with torch.inference_mode():
            start = time.perf_counter()
            call_s = None
            for _ in range(self.num_warmup):
                self._sync()
                begin = time.perf_counter()
                work()
                self._sync()
                call_s = time.perf_counter() - begin
                if time.perf_counter() - start > self.max_time_s:
                    break
            calls = self._calls_per_sample(call_s)
            samples_s: list[float] = []
            start = time.perf_counter()
            while len(samples_s) < self.num_repeats:
                if self.before_repeat is not None:
                    self.before_repeat()
                self._sync()
                begin = time.perf_counter()
                for _ in range(calls):
                    work()
                self._sync()
                end = time.perf_counter()
                samples_s.append((end - begin) / (divide_by * calls))
                if len(samples_s) >= MIN_REPEATS and end - start > self.max_time_s:
                    break
        return stats_of(samples_s)


class Series:
    """Timings keyed by grid point: one size (a curve) or (batch size, size) (a surface).

    A point measured in several rounds keeps every round and reports them combined
    (`across_rounds`)."""

    def __init__(self) -> None:
        self._points: dict[tuple[int, ...], list[TimingStats]] = {}

    def add(self, point: tuple[int, ...], stats: TimingStats) -> None:
        self._points.setdefault(point, []).append(stats)

    def __len__(self) -> int:
        return len(self._points)

    def stats(self, point: tuple[int, ...]) -> TimingStats:
        return across_rounds(self._points[point])

    def curve_json(self) -> dict[str, list[float] | list[int]]:
        """{"sizes", "median_s", "p10_s", "p90_s"} over the points (size,)."""
        return _series_json(sorted((point[-1], self.stats(point)) for point in self._points))

    def surface_json(self) -> dict[str, list[dict[str, object]]]:
        """{"rows": [{"batch_size", "sizes", "median_s", ...}]} over points (batch, size)."""
        rows: dict[int, list[tuple[int, TimingStats]]] = {}
        for point in self._points:
            batch, size = point
            rows.setdefault(batch, []).append((size, self.stats(point)))
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
