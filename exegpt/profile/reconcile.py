"""Parts and whole: the factor that scales a forward's summed parts to its measured time.

The profile times the building blocks of a forward one by one (attention, the rest of a
layer, embedding, LM head) and, at every attention grid point, the whole forward as the
engine runs it. The two disagree either way: a forward does work once outside the layers
(masks, position tables, index building) and its layers evict each other's caches, which
makes the whole longer; a layer timed alone in a loop can run colder or hotter than inside a
forward, which makes the parts longer. Reconciling them with a remainder floored at zero
trusts the parts wherever they outweigh the whole, which makes every prediction err on the
slow side.

Instead each grid point gets a factor, whole / parts. It is interpolated between the grid
points as measured (`Surface` with monotone=False, linear) and held at the grid's edge past
it (a ratio measured at the largest sizes is the best guess beyond them; a linear
extrapolation of a ratio has no bound). The profile applies one factor to every layer of a
forward, so the forward's prediction is the factor times its parts: exactly the measured
whole at every grid point, of either sign in between.

Attention's arguments name the forward (batch and lengths); the rest of a layer knows only
its tokens (encode) or its batch (decode). So the rest is scaled by the smallest factor of
the forwards of its size (`by_tokens`, `by_batch`), and attention by the forward's own factor
plus what the rest's factor leaves out for this forward, kept at or above zero. Every cost
stays a time whichever sizes a caller combines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exegpt.profile.format import SurfaceData
from exegpt.profile.interpolate import Curve, Surface


@dataclass(frozen=True)
class ForwardFactor:
    """whole / parts over (batch size, length), held constant past the measured grid."""

    surface: Surface
    max_batch_size: float
    max_length: float

    @classmethod
    def fit(
        cls,
        wholes: SurfaceData,
        parts_s: Callable[[int, int], float],
        fixed_s: Callable[[int, int], float] | None = None,
    ) -> ForwardFactor:
        """From the measured whole forwards and `parts_s(batch, length)`, the sum of the
        parts the profile predicts for the same forward; `fixed_s(batch, length)` is a part
        of the whole that is reconciled elsewhere (an encoder-decoder prefill's first
        decoder step) and is taken off the whole first. Raises ValueError when a sum of
        parts is not positive: no factor can scale it."""
        rows = []
        for row in wholes.rows:
            factors = []
            for size, whole_s in zip(row.sizes, row.median_s, strict=True):
                parts = parts_s(row.batch_size, size)
                if not parts > 0:
                    raise ValueError(
                        f"the parts of a forward (batch {row.batch_size}, length {size}) sum "
                        f"to {parts} s: a profile's costs must be positive"
                    )
                fixed = fixed_s(row.batch_size, size) if fixed_s is not None else 0.0
                factors.append(max(0.0, whole_s - fixed) / parts)
            rows.append((row.batch_size, row.sizes, factors))
        surface = Surface.fit(rows, monotone=False)
        longest = max(curve.max_size for curve in surface.rows)
        return cls(surface, surface.batch_sizes[-1], longest)

    def __call__(self, batch_size: float, length: float) -> tuple[float, bool]:
        """(factor, past the measured grid: held at its edge). Within the rows that reach the
        length (large batches may stop short of the longest lengths), linear in the length,
        then linear across their batch sizes; never extrapolated."""
        reach = min(length, self.max_length)
        batches, values = [], []
        for batch, row in zip(self.surface.batch_sizes, self.surface.rows, strict=True):
            if row.max_size >= reach:
                batches.append(batch)
                values.append(row(reach)[0])
        held = min(max(batch_size, batches[0]), batches[-1])
        value = Curve.fit(batches, values, monotone=False)(held)[0]
        return value, length > self.max_length or batch_size > batches[-1]

    def by_batch(self) -> HeldCurve:
        """The smallest factor of each batch size's row, over batch sizes: what a cost that
        knows only the batch (a decode step's rest of the layer) is scaled by."""
        smallest = [min(curve.values) for curve in self.surface.rows]
        return HeldCurve(Curve.fit(self.surface.batch_sizes, smallest, monotone=False))

    def by_tokens(self) -> HeldCurve:
        """The factor over a forward's tokens (batch x length; the smallest of the points
        with the same count): what a cost that knows only the tokens (an encode's rest) is
        scaled by."""
        points: dict[float, list[float]] = {}
        for batch, curve in zip(self.surface.batch_sizes, self.surface.rows, strict=True):
            for size, value in zip(curve.sizes, curve.values, strict=True):
                points.setdefault(batch * size, []).append(value)
        tokens = sorted(points)
        return HeldCurve(Curve.fit(tokens, [min(points[n]) for n in tokens], monotone=False))

    def grid_factors(self) -> list[float]:
        """The factor at every measured point (for reports and tests)."""
        return [value for curve in self.surface.rows for value in curve.values]


@dataclass(frozen=True)
class HeldCurve:
    """A factor over one size, linear between the measured sizes and held past them."""

    curve: Curve

    def __call__(self, size: float) -> float:
        return self.curve(min(size, self.curve.max_size))[0]


def scaled_attention_s(
    factor: float, attention_s: float, rest_factor: float, rest_s: float, outside_s: float
) -> float:
    """What a layer's attention reports so that the layer, with its rest scaled by
    `rest_factor` (rest_s is the unscaled rest) and its share `outside_s` of the work outside
    the layers left unscaled, sums to `factor` times all three. The rest carries the factor
    common to the forwards of its size; attention carries what differs between forwards of
    that size. At a grid point factor >= rest_factor, so only a factor below 1 meeting a large
    share of work outside the layers can take it below zero: it is kept at zero there (a cost
    is a time; the forward is then predicted a little long)."""
    excess = (factor - rest_factor) * rest_s + (factor - 1.0) * outside_s
    return max(0.0, factor * attention_s + excess)
