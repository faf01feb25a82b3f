"""Monotone interpolation of measured costs, with flagged linear extrapolation.

Costs never fall as sizes grow, but timings are noisy, so measured medians are first made
non-decreasing (isotonic regression, pool-adjacent-violators). Between grid points values
are interpolated in log-log space with a monotone cubic (PCHIP, Fritsch-Carlson slopes):
exact for power laws, and it follows the bend of costs such as a + b*n (a fixed cost that
gives way to a linear one) or a + c*S^2, which a straight log-log chord overestimates
between far-apart points (by 15-30% between sizes a factor 8 apart). Past the largest point the
cost grows linearly in the size with the last segment's slope (never negative); below the
smallest point it stays at the smallest point's value. Every query says whether it left
the measured range upwards: that is where predictions can go wrong without bound.

Pure Python on scalars (no numpy): the simulator queries these in tight loops.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

_FLOOR_S = 1e-9  # log-log interpolation needs positive values; far below any real cost


def isotonic(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in least squares (PAV)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            prev = blocks[-1]
            total = prev[1] + count
            prev[0] = (prev[0] * prev[1] + mean * count) / total
            prev[1] = total
    return [mean for mean, count in blocks for _ in range(int(count))]


@dataclass(frozen=True)
class Curve:
    """A non-decreasing cost over one size axis (or, fitted with monotone=False, any
    quantity, interpolated linearly)."""

    sizes: tuple[float, ...]  # strictly increasing, > 0
    values: tuple[float, ...]  # non-decreasing and >= 0 (unless fitted with monotone=False)
    slopes: tuple[float, ...] = ()  # d log(value) / d log(size) at each size (fit computes)

    @classmethod
    def fit(
        cls, sizes: Sequence[float], values: Sequence[float], *, monotone: bool = True
    ) -> Curve:
        """monotone=False: the values as measured (of either sign), linear in between: for a
        remainder such as a per-forward overhead, which need not grow with the size and
        whose noise pooling would spread from the large sizes to the small ones."""
        if not sizes or len(sizes) != len(values):
            raise ValueError("a curve needs as many values as sizes, and at least one")
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] <= 0:
            raise ValueError(f"curve sizes must be positive and increasing, got {list(sizes)}")
        if not monotone:
            return cls(tuple(float(s) for s in sizes), tuple(float(v) for v in values))
        monotone = isotonic([max(0.0, float(v)) for v in values])
        log_x = [math.log(float(s)) for s in sizes]
        log_y = [math.log(max(v, _FLOOR_S)) for v in monotone]
        return cls(tuple(float(s) for s in sizes), tuple(monotone), pchip_slopes(log_x, log_y))

    @property
    def max_size(self) -> float:
        return self.sizes[-1]

    def __call__(self, size: float) -> tuple[float, bool]:
        """(value, extrapolated above the largest size)."""
        sizes, values = self.sizes, self.values
        if size <= sizes[0]:
            return values[0], False
        if size > sizes[-1]:
            return self._extrapolate(size), True
        i = bisect.bisect_left(sizes, size)
        if sizes[i] == size:
            return values[i], False
        return self._between(i - 1, size), False

    def _between(self, k: int, size: float) -> float:
        """Monotone cubic Hermite in log-log space on the segment [sizes[k], sizes[k+1]]."""
        y0, y1 = self.values[k], self.values[k + 1]
        if y0 <= _FLOOR_S or y1 <= _FLOOR_S or not self.slopes:  # no logarithm: a line
            t = (size - self.sizes[k]) / (self.sizes[k + 1] - self.sizes[k])
            return y0 + t * (y1 - y0)
        x0, x1 = math.log(self.sizes[k]), math.log(self.sizes[k + 1])
        h = x1 - x0
        t = (math.log(size) - x0) / h
        t2, t3 = t * t, t * t * t
        log_y = (
            (2 * t3 - 3 * t2 + 1) * math.log(y0)
            + (t3 - 2 * t2 + t) * h * self.slopes[k]
            + (-2 * t3 + 3 * t2) * math.log(y1)
            + (t3 - t2) * h * self.slopes[k + 1]
        )
        return min(max(math.exp(log_y), y0), y1)  # stay within the segment

    def _extrapolate(self, size: float) -> float:
        sizes, values = self.sizes, self.values
        if len(sizes) == 1:  # one point: cost proportional to size
            return values[0] * size / sizes[0]
        slope = max(0.0, (values[-1] - values[-2]) / (sizes[-1] - sizes[-2]))
        return values[-1] + slope * (size - sizes[-1])


def pchip_slopes(x: Sequence[float], y: Sequence[float]) -> tuple[float, ...]:
    """Fritsch-Carlson derivatives at the knots of non-decreasing data (as SciPy's PCHIP):
    a weighted harmonic mean of the neighbouring secants inside, a three-point estimate
    at the ends; the Hermite cubic with these slopes never overshoots the data."""
    n = len(x)
    if n < 2:
        return (0.0,) * n
    h = [x[i + 1] - x[i] for i in range(n - 1)]
    secant = [(y[i + 1] - y[i]) / h[i] for i in range(n - 1)]
    if n == 2:
        return (secant[0], secant[0])
    slopes = [0.0] * n
    for k in range(1, n - 1):
        if secant[k - 1] <= 0 or secant[k] <= 0:
            continue
        w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
        slopes[k] = (w1 + w2) / (w1 / secant[k - 1] + w2 / secant[k])
    slopes[0] = _end_slope(h[0], h[1], secant[0], secant[1])
    slopes[-1] = _end_slope(h[-1], h[-2], secant[-1], secant[-2])
    return tuple(slopes)


def _end_slope(h0: float, h1: float, s0: float, s1: float) -> float:
    slope = ((2 * h0 + h1) * s0 - h0 * s1) / (h0 + h1)
    if slope <= 0 or s0 <= 0:
        return 0.0
    if s1 <= 0 and slope > 3 * s0:
        return 3 * s0
    return slope


@dataclass(frozen=True)
class Surface:
    """A cost over (batch size, length), measured on rows of batch sizes.

    Rows may stop at different lengths (large batches skip the longest lengths). A query
    interpolates along the length within every row that reaches it, then across those rows'
    batch sizes; when no row reaches the length, the rows that reach furthest extrapolate.
    """

    batch_sizes: tuple[float, ...]  # strictly increasing
    rows: tuple[Curve, ...]  # one per batch size, over lengths
    monotone: bool = True  # see Curve.fit

    @classmethod
    def fit(
        cls,
        rows: Sequence[tuple[float, Sequence[float], Sequence[float]]],
        *,
        monotone: bool = True,
    ) -> Surface:
        """From (batch size, lengths, values) rows."""
        ordered = sorted(rows, key=lambda row: row[0])
        batch_sizes = tuple(float(batch) for batch, _, _ in ordered)
        if not ordered or any(b <= a for a, b in zip(batch_sizes, batch_sizes[1:], strict=False)):
            raise ValueError(f"surface batch sizes must be distinct and present: {batch_sizes}")
        curves = tuple(Curve.fit(sizes, values, monotone=monotone) for _, sizes, values in ordered)
        return cls(batch_sizes, curves, monotone)

    def __call__(self, batch_size: float, length: float) -> tuple[float, bool]:
        longest = max(row.max_size for row in self.rows)
        reach = min(length, longest)
        batches, values, extrapolated = [], [], length > longest
        for batch, row in zip(self.batch_sizes, self.rows, strict=True):
            if row.max_size >= reach:
                value, row_extrapolated = row(length)
                batches.append(batch)
                values.append(value)
                extrapolated = extrapolated or row_extrapolated
        value, batch_extrapolated = Curve.fit(batches, values, monotone=self.monotone)(batch_size)
        return value, extrapolated or batch_extrapolated
