"""A reduced profiling grid (seconds, not minutes) and a profiling request that uses it: shared
by the profiler's tests and the scheduler's tests on a really measured profile."""

from __future__ import annotations

from services.profiler.measure.grid import ProfileGrid
from services.profiler.measure.run import ProfileRequest

# Small enough that a TP-1 profile of the default model takes about a second.
TINY_GRID = ProfileGrid(
    batch_sizes=(1, 2),
    seq_lens_tokens=(8, 32),
    kv_lens_tokens=(1, 16),
    num_tokens=(1, 4, 32),
    message_bytes=(1024, 65536),
    num_warmup=1,
    num_repeats=3,
    max_measure_s=0.05,
)


def tiny_request(**overrides: object) -> ProfileRequest:
    options: dict[str, object] = {"grid_name": "tiny", "grid": TINY_GRID, "tp_degrees": (1,)}
    options.update(overrides)
    return ProfileRequest(**options)  # type: ignore[arg-type]
