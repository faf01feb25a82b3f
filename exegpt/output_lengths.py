"""Output lengths learned online (shared by the engine's policies and the scheduler's
simulation of them): a bounded window of the lengths of finished requests, kept
sorted, from which a policy reads a high quantile (to predict a peak) or a mean (to predict
work), conditioned on the tokens a request has generated so far and capped by its max_tokens.

Before anything finished the model knows nothing and predicts max_tokens (the worst case).
Thread-safe: the engine thread learns, the stats thread reads.

Reads are kept cheap because the engine makes one per decoding sequence a step (the
long-output chunk budget) and the load push one per request: beside the sorted lengths the
model keeps their suffix sums, updated as each length is observed (O(window), once per
finished request), so a mean of the lengths beyond n tokens is one bisection and a
division, and a quantile one bisection and an index: no read copies or sums the window.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
from collections.abc import Callable, Iterable


class OutputLengthModel:
    def __init__(self, window: int = 2048, min_samples: int = 8) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        self._window = window
        self._min_samples = min_samples
        self._order: collections.deque[int] = collections.deque()
        self._sorted: list[int] = []
        # _suffix[i]: the sum of _sorted[i:] (one entry more than _sorted: _suffix[-1] == 0).
        self._suffix: list[int] = [0]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sorted)

    def observe(self, num_output_tokens: int) -> None:
        with self._lock:
            if len(self._order) >= self._window:
                self._remove(self._order.popleft())
            self._order.append(num_output_tokens)
            self._insert(num_output_tokens)

    def _insert(self, length: int) -> None:
        """Insert `length` in order; every suffix sum up to its place grows by it."""
        index = bisect.bisect_right(self._sorted, length)
        self._sorted.insert(index, length)
        self._suffix.insert(index + 1, self._suffix[index])
        self._suffix[: index + 1] = [total + length for total in self._suffix[: index + 1]]

    def _remove(self, length: int) -> None:
        """Remove one `length`; every suffix sum up to its place shrinks by it."""
        index = bisect.bisect_left(self._sorted, length)
        del self._sorted[index]
        del self._suffix[index]
        self._suffix[:index] = [total - length for total in self._suffix[:index]]

    def quantile(self, q: float, num_generated: int, max_tokens: int) -> int:
        """The q-quantile of the total output length of a request that has generated
        `num_generated` tokens (of lengths seen beyond that), in [num_generated + 1,
        max_tokens]; max_tokens while too few such lengths were seen."""
        with self._lock:
            start = self._tail_start(num_generated)
            if start is None:
                return max_tokens
            count = len(self._sorted) - start
            value = self._sorted[start + max(0, min(count - 1, math.ceil(q * count) - 1))]
        return max(num_generated + 1, min(max_tokens, value))

    def expected_remaining(self, num_generated: int, max_tokens: int) -> float:
        """Mean tokens still to come for a request that has generated `num_generated`
        (max_tokens in all while too few lengths beyond them were seen: the worst case)."""
        total = self.expected_total(num_generated, max_tokens)
        return max(1.0, (max_tokens if total is None else total) - num_generated)

    def expected_total(self, num_generated: int, max_tokens: int) -> float | None:
        """The mean total output length of a request that has generated `num_generated`
        tokens (of lengths seen beyond that), capped by max_tokens; None while fewer than
        min_samples such lengths were seen (no estimate)."""
        with self._lock:
            start = self._tail_start(num_generated)
            if start is None:
                return None
            return min(max_tokens, self._suffix[start] / (len(self._sorted) - start))

    def _tail_start(self, num_generated: int) -> int | None:
        """Where the lengths seen beyond num_generated start in the sorted window, or None
        while fewer than min_samples lie there."""
        start = bisect.bisect_right(self._sorted, num_generated)
        return start if len(self._sorted) - start >= self._min_samples else None


def predicted_peak_blocks(
    sequences: Iterable[tuple[int, int, int]], blocks_at: Callable[[int, int], int]
) -> int:
    """Most KV blocks the sequences are predicted to hold at once from now on.

    Each sequence is (prompt tokens, tokens generated, tokens predicted still to come);
    `blocks_at(prompt, generated)` is the blocks one holds. Sequences finish at different
    times, so the peak is taken over the moments each one is predicted to finish: at the
    t-th step from now every sequence still running holds the blocks of its tokens + t.
    """
    sequences = list(sequences)
    peak = 0
    for t in sorted({left for _, _, left in sequences}):
        held = sum(
            blocks_at(prompt, generated + t) for prompt, generated, left in sequences if left >= t
        )
        peak = max(peak, held)
    return peak


def predicted_start_step(
    sequences: Iterable[tuple[int, int, int]],
    head: tuple[int, int, int],
    budget_blocks: int,
    blocks_at: Callable[[int, int], int],
) -> int:
    """The first step from now at which `head` (prompt, generated, predicted left, as in
    `predicted_peak_blocks`) is predicted to fit beside the sequences still running: the
    first of the moments they finish (a sequence with `left` tokens to come holds its blocks
    through step `left`, and from step T on the others hold those of their tokens + T) at
    which the predicted peak of the rest and the head is within `budget_blocks`. The last
    finish when nothing fits before (the head alone then)."""
    sequences = list(sequences)
    moments = sorted({0, *(left for _, _, left in sequences)})
    for start in moments:
        rest = [(p, g + start, left - start) for p, g, left in sequences if left > start]
        if predicted_peak_blocks([*rest, head], blocks_at) <= budget_blocks:
            return start
    return moments[-1]


class BackfillDeadlines:
    """For each request that blocked the queue, the step by which it was first predicted to
    fit: fixed when it first blocks and never extended, whatever request blocks in between
    (a mode may offer the waiting requests in another order from one round to the next).
    Requests behind it may pass it only if they are predicted to finish by then
    (`within_backfill`), and in strict order once it passed. A window recomputed each round
    instead moves out whenever a running sequence outlives its prediction, and a stream of
    short requests can then starve the head indefinitely. The caller forgets a request once
    it is admitted, aborted or failed (`forget`, `keep_only`), so the table is bounded by
    the queue."""

    def __init__(self) -> None:
        self._steps: dict[object, int] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def of(self, head: object, now: int, start_in: Callable[[], int]) -> int:
        """The deadline for `head` (a request or sequence id): now + `start_in()`
        (predicted_start_step, asked only then) the first time it blocks, else the one
        recorded then."""
        step = self._steps.get(head)
        if step is None:
            step = self._steps[head] = now + start_in()
        return step

    def forget(self, head: object) -> None:
        self._steps.pop(head, None)

    def keep_only(self, heads: Iterable[object]) -> None:
        """Drop the deadlines of every request not in `heads` (those still waiting)."""
        waiting = set(heads)
        self._steps = {h: step for h, step in self._steps.items() if h in waiting}


# Backfill reads at most this many requests behind a blocked head, engine and simulator alike:
# each is checked against the running batch, and a blocked head is re-tried every step.
BACKFILL_WINDOW = 32


def within_backfill(now: int, steps_to_finish: float, deadline: int) -> bool:
    """Whether a request predicted to finish `steps_to_finish` steps from `now` may pass a
    blocked head whose deadline (`BackfillDeadlines`) is the absolute step `deadline`: before the
    deadline, and finishing by it."""
    return now < deadline and now + steps_to_finish <= deadline
