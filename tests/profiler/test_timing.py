"""The timer: warm-up, repeats, samples stretched to a minimum span, re-measuring when disturbed."""

from __future__ import annotations

import time

import pytest
import torch

from services.profiler.measure.contention import ContentionMonitor
from services.profiler.measure.grid import QUICK, ProfileGrid
from services.profiler.measure.timing import Timer, across_rounds, stats_of

CPU = torch.device("cpu")


class CountingWork:
    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s

    def __call__(self) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)


class AlwaysBusy(ContentionMonitor):
    """Reports another process on our CPUs during every measurement."""

    def contended(self, before: object, elapsed_s: float) -> bool:
        return True


def test_stats_and_rounds() -> None:
    stats = stats_of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median_s, stats.p10_s, stats.p90_s, stats.num_repeats) == (3.0, 1.4, 4.6, 5)
    slow_round = stats_of([10.0, 11.0, 12.0])
    combined = across_rounds([stats_of([1.0, 2.0, 3.0]), stats_of([2.0, 3.0, 4.0]), slow_round])
    assert combined.median_s == 3.0  # the median of the rounds' medians: 2, 3, 11
    assert combined.num_repeats == 9
    with pytest.raises(ValueError, match="no timing samples"):
        stats_of([])


def test_one_call_per_sample_by_default() -> None:
    work = CountingWork()
    stats = Timer(CPU, num_warmup=2, num_repeats=5).measure(work)
    assert work.calls == 2 + 5 and stats.num_repeats == 5


def test_short_work_is_timed_over_the_minimum_span() -> None:
    work = CountingWork(sleep_s=0.002)
    timer = Timer(CPU, num_warmup=1, num_repeats=3, min_sample_s=0.02)
    stats = timer.measure(work, divide_by=2)
    calls_per_sample = (work.calls - 1) / 3
    assert calls_per_sample == int(calls_per_sample) and 4 <= calls_per_sample <= 10
    # each sample is the time of one call, divided by the two layers it stands for
    assert 0.001 <= stats.median_s < 0.005


def test_a_cache_flush_before_each_sample_keeps_one_call_per_sample() -> None:
    work, flushes = CountingWork(sleep_s=0.001), CountingWork()
    timer = Timer(CPU, num_warmup=1, num_repeats=3, min_sample_s=0.05, before_repeat=flushes)
    timer.measure(work)
    assert work.calls == 1 + 3 and flushes.calls == 3


def test_disturbed_measurements_are_taken_again_and_counted() -> None:
    work = CountingWork()
    timer = Timer(
        CPU, num_warmup=0, num_repeats=3, max_retries=2, retry_pause_s=0, monitor=AlwaysBusy()
    )
    timer.measure(work)
    assert work.calls == 3 * 3  # the first attempt and two retries
    assert (timer.num_measurements, timer.num_retries, timer.num_contended) == (1, 2, 1)


def test_the_grid_checks_the_minimum_sample_span() -> None:
    assert 0 < QUICK.min_sample_s <= QUICK.max_measure_s
    with pytest.raises(ValueError, match="min_sample_s must be between 0 and max_measure_s"):
        ProfileGrid.from_dict({**QUICK.to_dict(), "min_sample_s": 2.0})
