"""Which engine policy a replica runs (--engine-policy) and its knobs."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EnginePolicy(enum.StrEnum):
    FCFS = "fcfs"
    MEMORY_AWARE = "memory_aware"
    SJF = "sjf"


@dataclass(frozen=True)
class PolicyConfig:
    name: EnginePolicy = EnginePolicy.FCFS
    # memory_aware: the quantile of the observed output lengths a running request is
    # predicted to reach (conditioned on what it generated, capped by its max_tokens).
    length_quantile: float = 0.95
    # memory_aware: admit a request past a head that does not fit while it is predicted to
    # finish by the step the head is predicted to fit (memory_aware.py). Off by default: it
    # measured no better than strict order within this machine's noise (docs/measurements.md).
    backfill: bool = False
    # sjf: a request that waited this long goes before every shorter one (aging bound).
    max_wait_s: float = 10.0
    # sjf: how much one prompt token weighs against one decode token in predicted work.
    prefill_token_weight: float = 0.1
    # Finished requests' output lengths kept to learn from.
    length_window: int = 2048

    def __post_init__(self) -> None:
        if not 0 < self.length_quantile <= 1:
            raise ValueError("length_quantile must be in (0, 1]")
        if self.max_wait_s <= 0 or self.prefill_token_weight < 0 or self.length_window < 1:
            raise ValueError("max_wait_s > 0, prefill_token_weight >= 0, length_window >= 1")
        if self.backfill and self.name != EnginePolicy.MEMORY_AWARE:
            raise ValueError(
                f"backfill (--backfill) needs --engine-policy memory_aware, not {self.name}"
            )
