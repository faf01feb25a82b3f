"""The one definition of latency: the p99-length request's admission to last token."""

from __future__ import annotations

import math

import pytest

from exegpt.latency import Generation, p99_length, p99_length_latency


def test_p99_length_is_the_nearest_rank() -> None:
    assert p99_length([]) == 0
    assert p99_length(range(1, 101)) == 99
    assert p99_length([7]) == 7
    assert p99_length([3, 50] + [10] * 98) == 10  # ceil(0.99 * 100) = 99th of 100


def test_latency_is_the_mean_of_the_requests_at_or_beyond_the_p99_length() -> None:
    generations = [Generation(n, n / 10) for n in range(1, 101)]
    assert p99_length_latency(generations) == (pytest.approx(9.95), 99)
    # The workload's p99 length can be given: the prediction is for that length.
    assert p99_length_latency(generations, 50) == (pytest.approx(7.5), 50)


def test_a_short_run_that_never_reached_the_length_reads_its_longest() -> None:
    generations = [Generation(10, 1.0), Generation(20, 2.0), Generation(20, 3.0)]
    assert p99_length_latency(generations, 400) == (pytest.approx(2.5), 20)


def test_nothing_measured_is_nan() -> None:
    latency_s, length = p99_length_latency([])
    assert math.isnan(latency_s) and length == 0
