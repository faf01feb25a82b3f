"""The one definition of latency: the p99-length request's admission to last token."""

from __future__ import annotations

import math

import pytest

from exegpt.latency import Generation, line_at, p99_length, p99_length_latency


def test_p99_length_is_the_nearest_rank() -> None:
    assert p99_length([]) == 0
    assert p99_length(range(1, 101)) == 99
    assert p99_length([7]) == 7
    assert p99_length([3, 50] + [10] * 98) == 10  # ceil(0.99 * 100) = 99th of 100


def test_latency_is_the_mean_of_the_requests_at_the_p99_length() -> None:
    generations = [Generation(n, n / 10) for n in range(1, 98)] + [Generation(100, 12.0)] * 3
    assert p99_length_latency(generations) == (pytest.approx(12.0), 100)
    # The workload's p99 length can be given: the prediction is for that length. One request
    # has it, so the line through the longer half (50..100, 0.1 s a token) is read there.
    generations = [Generation(n, n / 10) for n in range(1, 101)]
    assert p99_length_latency(generations, 50) == (pytest.approx(5.0), 50)


def test_requests_beyond_the_p99_length_do_not_count() -> None:
    # An RRA-like step: requests longer than the p99 length (36) finish after the next
    # encoding, 4 s later. The p99-length request itself finishes within the cycle.
    generations = [Generation(n, 9.0 + 0.01 * n) for n in range(20, 37) for _ in range(3)]
    generations += [Generation(n, 13.5) for n in range(37, 41) for _ in range(3)]
    assert p99_length_latency(generations, 36) == (pytest.approx(9.36), 36)


def test_a_short_run_reads_the_line_of_latency_against_length() -> None:
    # 0.5 s of encoding, then 0.1 s a token; only one request reached the p99 length.
    generations = [Generation(n, 0.5 + 0.1 * n) for n in (5, 10, 15, 20, 40)]
    assert p99_length_latency(generations, 40) == (pytest.approx(4.5), 40)
    # None reached it: the line is extended to it.
    assert p99_length_latency(generations, 60) == (pytest.approx(6.5), 60)
    # One length only, or a line falling with length (noise): the longest ones' mean.
    assert p99_length_latency([Generation(8, 1.0), Generation(8, 2.0)], 60)[0] == 1.5
    falling = [Generation(4, 3.0), Generation(8, 2.0), Generation(9, 1.0)]
    assert p99_length_latency(falling, 60) == (1.0, 60)


def test_a_static_batchs_concave_latency_reads_the_line_of_its_longer_half() -> None:
    # Lengths 2..20 in static batches: the first 9 decode steps run beside the whole batch
    # (0.1 s each), later ones beside the few rows left (0.02 s each), after 0.5 s of
    # prefill. At 30 tokens: 0.5 + 9 x 0.1 + 20 x 0.02 = 1.8 s. The longer half (11..20)
    # lies on the late slope; a line through all of them would read 2.29 s.
    def latency_s(n: int) -> float:
        return 0.5 + 0.1 * min(n - 1, 9) + 0.02 * max(0, n - 10)

    generations = [Generation(n, latency_s(n)) for n in range(2, 21)]
    assert p99_length_latency(generations, 30) == (pytest.approx(1.8), 30)
    assert line_at(generations, 30) > 2.1


def test_nothing_measured_is_nan() -> None:
    latency_s, length = p99_length_latency([])
    assert math.isnan(latency_s) and length == 0
