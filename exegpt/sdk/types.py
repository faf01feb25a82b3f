"""Typed results returned by the client SDK."""

from __future__ import annotations

from dataclasses import dataclass, field

from exegpt.errors import RequestError

__all__ = ["Completion", "CompletionChunk", "ExegptError"]


class ExegptError(RequestError):
    """A request failed; `code` says why (invalid_argument, resource_exhausted, ...)."""


@dataclass(frozen=True)
class CompletionChunk:
    """Tokens that arrived together while streaming; the last one has finish_reason and usage."""

    text: str
    token_ids: list[int]
    # Seconds since the call started, as measured by this client, when the chunk arrived.
    arrival_s: float
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # With the finish: seconds the request waited in the engine's queue before its first
    # admission into a batch, and from that admission to its last token (its generation
    # latency, exegpt/latency.py), both as the engine measured them.
    queue_s: float = 0.0
    generation_s: float = 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # Seconds from sending the request to the first token.
    ttft_s: float
    # Seconds from sending the request to each generated token (streaming: measured here;
    # unary: as stamped by the engine, relative to its receipt of the request).
    token_times_s: list[float] = field(default_factory=list)
    request_id: str = ""
    # Seconds the request waited in the engine's queue before its first admission: latency_s
    # minus this also holds the time before the engine received it.
    queue_s: float = 0.0
    # Seconds from its first admission to its last token, as the engine measured them: its
    # generation latency (exegpt/latency.py).
    generation_s: float = 0.0

    @property
    def latency_s(self) -> float:
        return self.token_times_s[-1] if self.token_times_s else 0.0
