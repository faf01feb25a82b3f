"""The engine's queue of requests not yet admitted, with its load kept as it changes.

A load push (WatchLoad, up to 20 a second) reports the queued prompt tokens and the decode
tokens the queue is expected to generate. Walking thousands of waiting requests for that
took milliseconds on the engine's hot lock, so the queue keeps the sums as requests come
and go: the prompt tokens, and how many requests wait with each `max_tokens` (a waiting
request has generated nothing, so its expected remaining tokens depend on `max_tokens`
alone). Each distinct value is priced against the learned lengths when asked: a client
that sends one max_tokens costs one estimate, while `exegpt bench` sends each request's
true output length, so a snapshot may price hundreds of values (each a bisection).

Admission does not walk the queue either: the requests are held in an insertion-ordered
dict keyed by request id (the server makes ids unique), so a schedule mode iterates them
lazily in arrival order and stops once it has chosen, and an admitted or aborted request
leaves by its id, not by a search. (sjf must still read every waiting request to find the
shortest, and an RRA encoding reads on to the last query it takes, or to the end of the
queue when its input band leaves the encoding short.)
Not thread-safe: the scheduler guards it with its lock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

from exegpt.generation import InvalidRequestError
from services.worker.requests import EngineRequest


class WaitingQueue:
    """Requests in arrival order (a policy may admit any of them), with their totals."""

    def __init__(self) -> None:
        self._requests: dict[str, EngineRequest] = {}
        self._max_tokens: collections.Counter[int] = collections.Counter()
        self.prompt_tokens = 0

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[EngineRequest]:
        """The waiting requests, oldest first (do not change the queue while iterating)."""
        return iter(self._requests.values())

    def get(self, request_id: str) -> EngineRequest | None:
        """The queued request of this id, or None."""
        return self._requests.get(request_id)

    def append(self, request: EngineRequest) -> None:
        """Queue `request` last (InvalidRequestError when its id is already queued)."""
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request {request.request_id!r} is already queued")
        self._requests[request.request_id] = request
        self._count(request, 1)

    def remove(self, request: EngineRequest) -> None:
        """Take `request` out by its id (ValueError when it is not queued)."""
        if self._requests.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id!r} is not queued")
        self.pop(request.request_id)

    def pop(self, request_id: str) -> EngineRequest | None:
        """Take the request of this id out; None when none is queued."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._count(request, -1)
        return request

    def take_all(self) -> list[EngineRequest]:
        """Empty the queue; returns what waited, oldest first."""
        taken = list(self._requests.values())
        self._requests.clear()
        self._max_tokens.clear()
        self.prompt_tokens = 0
        return taken

    def expected_decode_tokens(self, expected_remaining: Callable[[int, int], float]) -> float:
        """The tokens the queued requests are expected to generate, by
        `expected_remaining(num_generated, max_tokens)` once per distinct max_tokens."""
        return sum(count * expected_remaining(0, m) for m, count in self._max_tokens.items())

    def _count(self, request: EngineRequest, sign: int) -> None:
        self.prompt_tokens += sign * len(request.prompt_token_ids)
        max_tokens = request.sampling.max_tokens
        self._max_tokens[max_tokens] += sign
        if not self._max_tokens[max_tokens]:
            del self._max_tokens[max_tokens]
