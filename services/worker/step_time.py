"""The engine's own clock of its steps: seconds = fixed + per_token x tokens, fitted online.

A step's time on this engine is close to linear in the tokens it carries: a fixed part (the
weights read once, one kernel call per layer and operator, the host's planning and sampling)
and a part that grows with every token (the projections and feed-forward of each). The fit is
a line through the median step of each size class over the most recent steps, so it follows a
machine whose speed changes (other work on the same cores) and shrugs off a single slow step.
Until the recent steps spread enough tokens to tell the two parts apart, or when they fit no
positive slope, the model gives no prediction.
"""

from __future__ import annotations

import collections
import math
import statistics

# Steps the fit reads (the newest); fewer than MIN_STEPS give no prediction.
WINDOW = 128
MIN_STEPS = 8
# The largest step of the window must carry this many times the tokens of the smallest.
MIN_SPREAD = 4


class StepTimeModel:
    def __init__(self, window: int = WINDOW) -> None:
        self._steps: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._fit: tuple[float, float] | None = None  # (fixed_s, per_token_s)
        self._stale = False

    def observe(self, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` new tokens took `seconds`."""
        if num_tokens > 0 and seconds > 0 and math.isfinite(seconds):
            self._steps.append((num_tokens, seconds))
            self._stale = True

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None while the steps cannot tell them."""
        if self._stale:
            self._fit, self._stale = _least_squares(list(self._steps)), False
        return self._fit

    def tokens_within(self, seconds: float) -> int | None:
        """The most tokens a step may carry and still take at most `seconds` (None: no fit)."""
        fit = self.fit()
        if fit is None:
            return None
        fixed_s, per_token_s = fit
        return max(0, math.floor((seconds - fixed_s) / per_token_s))

    def seconds(self, num_tokens: int) -> float | None:
        """The predicted time of a step of `num_tokens` (None: no fit)."""
        fit = self.fit()
        return None if fit is None else fit[0] + fit[1] * num_tokens


def _least_squares(steps: list[tuple[int, float]]) -> tuple[float, float] | None:
    """The line through the medians of the steps' size classes (powers of two of tokens): a
    step slowed by other work on the cores moves its class's median little, a plain fit much."""
    if len(steps) < MIN_STEPS:
        return None
    classes: dict[int, list[tuple[int, float]]] = {}
    for num_tokens, seconds in steps:
        classes.setdefault(num_tokens.bit_length(), []).append((num_tokens, seconds))
    points = [
        (statistics.median(n for n, _ in members), statistics.median(s for _, s in members))
        for members in classes.values()
    ]
    tokens = [n for n, _ in points]
    if len(points) < 2 or max(tokens) < MIN_SPREAD * min(tokens):
        return None
    mean_n = statistics.fmean(tokens)
    mean_s = statistics.fmean(s for _, s in points)
    covariance = sum((n - mean_n) * (s - mean_s) for n, s in points)
    variance = sum((n - mean_n) ** 2 for n in tokens)
    per_token_s = covariance / variance
    if per_token_s <= 0:
        return None
    return max(0.0, mean_s - per_token_s * mean_n), per_token_s
