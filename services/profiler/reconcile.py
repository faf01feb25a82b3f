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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.profiler.interpolate import Surface
from services.profiler.profile_format import SurfaceData


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
        """(factor, past the measured grid: held at its edge)."""
        value, extrapolated = self.surface(
            min(batch_size, self.max_batch_size), min(length, self.max_length)
        )
        past = batch_size > self.max_batch_size or length > self.max_length
        return value, past or extrapolated

    def grid_factors(self) -> list[float]:
        """The factor at every measured point (for reports and tests)."""
        return [value for curve in self.surface.rows for value in curve.values]


def scaled_layer_s(factor: float, own_s: float, shared_s: float, rest_s: float) -> float:
    """What a layer's `own_s` part (attention) reports so that, added to the unscaled
    `shared_s` (the layer's rest plus its share of the work outside the layers), the sum is
    `factor` times both. Below 1 that can be negative: the correction is the forward's, not
    the kernel's, and every consumer adds the layer's `rest_s` to it, so it is kept only at
    or above -rest_s (a layer never takes less than no time)."""
    return max(-rest_s, factor * own_s + (factor - 1.0) * shared_s)
