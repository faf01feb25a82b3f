"""Monotone interpolation of measured costs, with flagged linear extrapolation.

Costs never fall as sizes grow, but timings are noisy, so measured medians are first made
non-decreasing (isotonic regression, pool-adjacent-violators). Between grid points values
are interpolated piecewise-linearly in log-log space (exact for power laws, so a quadratic
attention cost is not overestimated between far-apart points). Past the largest point the
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
    """A non-decreasing cost over one size axis."""

    sizes: tuple[float, ...]  # strictly increasing, > 0
    values: tuple[float, ...]  # non-decreasing, >= 0

    @classmethod
    def fit(cls, sizes: Sequence[float], values: Sequence[float]) -> Curve:
        if not sizes or len(sizes) != len(values):
            raise ValueError("a curve needs as many values as sizes, and at least one")
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] <= 0:
            raise ValueError(f"curve sizes must be positive and increasing, got {list(sizes)}")
        monotone = isotonic([max(0.0, float(v)) for v in values])
        return cls(tuple(float(s) for s in sizes), tuple(monotone))

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
        return _loglog(sizes[i - 1], values[i - 1], sizes[i], values[i], size), False

    def _extrapolate(self, size: float) -> float:
        sizes, values = self.sizes, self.values
        if len(sizes) == 1:  # one point: cost proportional to size
            return values[0] * size / sizes[0]
        slope = max(0.0, (values[-1] - values[-2]) / (sizes[-1] - sizes[-2]))
        return values[-1] + slope * (size - sizes[-1])


def _loglog(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    ly0, ly1 = math.log(max(y0, _FLOOR_S)), math.log(max(y1, _FLOOR_S))
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    value = math.exp(ly0 + t * (ly1 - ly0))
    return min(max(value, y0), y1)  # guard rounding at the ends: stay within the segment


@dataclass(frozen=True)
class Surface:
    """A cost over (batch size, length), measured on rows of batch sizes.

    Rows may stop at different lengths (large batches skip the longest lengths). A query
    interpolates along the length within every row that reaches it, then across those rows'
    batch sizes; when no row reaches the length, the rows that reach furthest extrapolate.
    """

    batch_sizes: tuple[float, ...]  # strictly increasing
    rows: tuple[Curve, ...]  # one per batch size, over lengths

    @classmethod
    def fit(cls, rows: Sequence[tuple[float, Sequence[float], Sequence[float]]]) -> Surface:
        """From (batch size, lengths, values) rows."""
        ordered = sorted(rows, key=lambda row: row[0])
        batch_sizes = tuple(float(batch) for batch, _, _ in ordered)
        if not ordered or any(b <= a for a, b in zip(batch_sizes, batch_sizes[1:], strict=False)):
            raise ValueError(f"surface batch sizes must be distinct and present: {batch_sizes}")
        return cls(batch_sizes, tuple(Curve.fit(sizes, values) for _, sizes, values in ordered))

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
        value, batch_extrapolated = Curve.fit(batches, values)(batch_size)
        return value, extrapolated or batch_extrapolated
