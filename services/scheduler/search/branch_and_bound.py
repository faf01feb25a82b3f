"""Monotonic branch-and-bound over the index box of a sub-space (plan.py explains it)."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from services.scheduler.problem import PlanProblem, Prediction
from services.scheduler.search.space import Evaluator, Index, SubSpace, same_latency


@dataclass(frozen=True)
class Box:
    lo: Index
    hi: Index

    def corners(self) -> Iterator[Index]:
        return itertools.product(*({a, b} for a, b in zip(self.lo, self.hi, strict=True)))

    def is_atomic(self) -> bool:
        return all(b - a <= 1 for a, b in zip(self.lo, self.hi, strict=True))

    def split(self) -> tuple[Box, Box]:
        axis = max(range(len(self.lo)), key=lambda i: self.hi[i] - self.lo[i])
        mid = (self.lo[axis] + self.hi[axis]) // 2
        left_hi = self.hi[:axis] + (mid,) + self.hi[axis + 1 :]
        right_lo = self.lo[:axis] + (mid + 1,) + self.lo[axis + 1 :]
        return Box(self.lo, left_hi), Box(right_lo, self.hi)


def maximise(
    sub: SubSpace,
    evaluate: Evaluator,
    problem: PlanProblem,
    score: Callable[[Prediction], float],
    admissible: Callable[[Prediction], bool],
    incumbent: Prediction | None,
    tolerance: Callable[[float], float],
) -> Prediction | None:
    """The admissible point of `sub` with the highest `score` (ties: lower latency, then higher
    throughput), or the
    given incumbent if nothing beats it. A box is dropped only when its bound plus
    `tolerance(bound)` is still below the incumbent's score (the paper's rule): the corners
    bound a box exactly only where the functions are monotonic, and measured profiles are
    monotonic within a tolerance, not exactly, so the slack keeps a box whose interior may
    beat its corners by up to that much."""
    bound_s = problem.planning_bound_s + problem.latency_tolerance_s
    capacity = problem.device_memory_bytes

    def outranks(prediction: Prediction, other: Prediction) -> bool:
        """A higher score; at the same score (but for rounding) lower latency, then higher
        throughput."""
        if not math.isclose(score(prediction), score(other), rel_tol=1e-9):
            return score(prediction) > score(other)
        if not same_latency(prediction, other):
            return prediction.latency_s < other.latency_s
        return prediction.throughput_seq_s > other.throughput_seq_s

    def beaten(value: float) -> bool:
        return incumbent is not None and value + tolerance(value) <= score(incumbent)

    def bound(box: Box) -> float | None:
        """Best corner score, or None when the whole box is over the bound or memory."""
        nonlocal incumbent
        corners = [evaluate(sub.schedule(index)) for index in box.corners()]
        for prediction in corners:
            if admissible(prediction) and (incumbent is None or outranks(prediction, incumbent)):
                incumbent = prediction
        if min(p.latency_s for p in corners) > bound_s:
            return None
        if min(max(p.memory_bytes_per_device) for p in corners) > capacity:
            return None
        return max(score(p) for p in corners)

    queue: list[tuple[float, int, Box]] = []
    counter = itertools.count()
    root = Box((0,) * len(sub.axes), sub.top)
    root_bound = bound(root)
    if root_bound is not None:
        heapq.heappush(queue, (-root_bound, next(counter), root))
    while queue:
        negative_bound, _, box = heapq.heappop(queue)
        if beaten(-negative_bound):
            break  # every box left is bounded lower still
        if box.is_atomic():
            continue  # all its points were corners
        for child in box.split():
            child_bound = bound(child)
            if child_bound is not None and not beaten(child_bound):
                heapq.heappush(queue, (-child_bound, next(counter), child))
    return incumbent
