"""What the engine takes in and gives back: a request with its callback, and its events."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exegpt.generation import FinishReason, SamplingParams, TokenLogprob


class QueueFullError(RuntimeError):
    """The bounded queue is full; the client may retry later (RESOURCE_EXHAUSTED)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down, or its executor is broken, and takes no new requests
    (UNAVAILABLE: another replica may serve it)."""


@dataclass(frozen=True)
class RequestTimings:
    """Wall-clock stamps (ns since the epoch) of one request's phases, for tracing."""

    arrival_ns: int
    admitted_ns: int
    prefill_end_ns: int
    finished_ns: int
    prefill_batch_size: int


@dataclass(frozen=True)
class EngineEvent:
    request_id: str
    token_ids: list[int]
    token_times_s: list[float]
    finish_reason: FinishReason | None = None
    error: str | None = None
    timings: RequestTimings | None = None  # set with the finish
    # The replica could not serve (its executor broke), as opposed to this request failing.
    unavailable: bool = False
    # One per token in token_ids when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Seconds from arrival (the engine's receipt) to the request's first admission.
    queue_s: float = 0.0


@dataclass
class EngineRequest:
    request_id: str  # the engine's key: server-generated, unique
    prompt_token_ids: list[int]
    sampling: SamplingParams
    on_event: Callable[[EngineEvent], None]
    # The request's span (worker.generate): engine steps link to it.
    trace_context: Any = None
    arrival_s: float = field(default_factory=time.monotonic)
    arrival_ns: int = field(default_factory=time.time_ns)
