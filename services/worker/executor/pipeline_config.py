"""The pipeline executor's configuration: its stages, their KV cache and its timeouts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from exegpt.placement import Placement
from exegpt.security import SecurityConfig

# A grace is a head start for a frame already sent, a fraction of a step: a longer one only
# delays the build it was meant to hide.
MAX_AHEAD_GRACE_S = 0.1


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    dtype: str
    placement: Placement
    # gRPC address of every TP rank of every stage, in placement order.
    stage_addresses: tuple[tuple[str, ...], ...]
    num_blocks: int
    block_size_tokens: int
    data_host: str = "127.0.0.1"
    step_timeout_s: float = 30.0
    health_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    load_timeout_s: float = 120.0
    # How long after sending a decode step the engine waits before building its successor
    # ahead (ahead.py): on a machine with few cores, building at once delays the hand-off.
    # Whole milliseconds (the result socket's poll), rounded up; at most MAX_AHEAD_GRACE_S.
    ahead_grace_s: float = 0.001
    # API key and TLS of the gRPC control calls to the stages.
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        grace = self.ahead_grace_s
        if not (math.isfinite(grace) and 0 <= grace <= MAX_AHEAD_GRACE_S):
            raise ValueError(
                f"ahead_grace_s must lie between 0 and {MAX_AHEAD_GRACE_S} s, not {grace!r}"
            )

    @property
    def ahead_grace_ms(self) -> int:
        """`ahead_grace_s` in whole milliseconds, rounded up (a nonzero grace stays nonzero);
        taken to the microsecond first, so float error (0.003 s: 3.0000000000000004 ms) does
        not add a millisecond."""
        return math.ceil(round(self.ahead_grace_s * 1e6) / 1000)


class PipelineError(ConnectionError):
    """The stages could not be reached or loaded (the replica cannot start)."""
