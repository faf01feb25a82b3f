"""The output-length model's reads from its incremental suffix sums (exegpt/output_lengths.py):
the mean and quantile of the lengths beyond n tokens, as the window slides, against the
same figures computed from the window's lengths directly, and a hand-computed case."""

from __future__ import annotations

import math
import random

from exegpt.output_lengths import BackfillDeadlines, OutputLengthModel, within_backfill


def test_the_mean_beyond_n_tokens_follows_the_window_as_it_slides() -> None:
    lengths = OutputLengthModel(window=3, min_samples=1)
    for length in (10, 30, 20):
        lengths.observe(length)
    assert lengths.expected_total(0, 100) == 20.0  # (10 + 30 + 20) / 3
    assert lengths.expected_total(15, 100) == 25.0  # (30 + 20) / 2
    lengths.observe(40)  # 10 leaves the window: 30, 20, 40
    assert lengths.expected_total(0, 100) == 30.0
    assert lengths.expected_total(25, 100) == 35.0  # (30 + 40) / 2
    lengths.observe(20)  # 30 leaves: 20, 40, 20 (a repeated length)
    assert lengths.expected_total(0, 100) == 80 / 3
    assert lengths.expected_total(20, 100) == 40.0  # beyond 20: 40 alone
    assert lengths.expected_total(40, 100) is None  # none beyond 40


def test_incremental_reads_match_the_window_recomputed_on_random_lengths() -> None:
    rng = random.Random(7)
    window, min_samples = 50, 4
    lengths = OutputLengthModel(window=window, min_samples=min_samples)
    seen: list[int] = []
    for _ in range(400):
        length = rng.randint(1, 120)
        lengths.observe(length)
        seen = (seen + [length])[-window:]
        generated = rng.randint(0, 120)
        tail = sorted(x for x in seen if x > generated)
        if len(tail) < min_samples:
            assert lengths.expected_total(generated, 500) is None
            assert lengths.quantile(0.9, generated, 500) == 500
            continue
        assert math.isclose(lengths.expected_total(generated, 500), sum(tail) / len(tail))
        expected_q = tail[min(len(tail) - 1, math.ceil(0.9 * len(tail)) - 1)]
        assert lengths.quantile(0.9, generated, 500) == expected_q
        assert lengths.quantile(0.0, generated, 500) == max(generated + 1, tail[0])


def test_a_backfill_deadline_is_fixed_when_a_head_first_blocks_and_never_extended() -> None:
    deadlines = BackfillDeadlines()
    asked: list[int] = []

    def start_in(steps: int):
        return lambda: asked.append(steps) or steps

    assert deadlines.of("H", now=10, start_in=start_in(5)) == 15
    assert deadlines.of("H", now=12, start_in=start_in(20)) == 15  # kept, not asked again
    assert asked == [5]
    assert within_backfill(12, 3, 15) and not within_backfill(12, 4, 15)
    assert not within_backfill(15, 0, 15)  # passed: strict order
    assert deadlines.of("H2", now=30, start_in=start_in(4)) == 34  # a new blocked head
    # H blocks again after H2 did (a mode offering passed-over requests first): still 15.
    assert deadlines.of("H", now=31, start_in=start_in(9)) == 15
    deadlines.forget("H")  # admitted
    assert deadlines.of("H", now=40, start_in=start_in(1)) == 41
    deadlines.keep_only(["H2"])  # H gone (aborted)
    assert len(deadlines) == 1 and deadlines.of("H2", now=50, start_in=start_in(0)) == 34
