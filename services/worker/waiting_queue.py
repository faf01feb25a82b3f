"""The engine's queue of requests not yet admitted, with its load kept as it changes.

A load push (WatchLoad, up to 20 a second) reports the queued prompt tokens and the decode
tokens the queue is expected to generate. Walking thousands of waiting requests for that
took milliseconds on the engine's hot lock, so the queue keeps the sums as requests come
and go: the prompt tokens, and how many requests wait with each `max_tokens` (a waiting
request has generated nothing, so its expected remaining tokens depend on `max_tokens`
alone). Each distinct value is priced against the learned lengths when asked: a client
that sends one max_tokens costs one estimate, while `exegpt bench` sends each request's
true output length, so a snapshot may price hundreds of values (each a bisection).

Only the load push is spared the walk. Admission (services/worker/admission.py) still
copies the queue for the mode to choose from and removes each admitted request from the
deque by search, both under the scheduler's lock, once per admission pass.
Not thread-safe: the scheduler guards it with its lock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

from services.worker.requests import EngineRequest


class WaitingQueue:
    """Requests in arrival order (a policy may admit any of them), with their totals."""

    def __init__(self) -> None:
        self._requests: collections.deque[EngineRequest] = collections.deque()
        self._max_tokens: collections.Counter[int] = collections.Counter()
        self.prompt_tokens = 0

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[EngineRequest]:
        return iter(self._requests)

    def append(self, request: EngineRequest) -> None:
        self._requests.append(request)
        self._count(request, 1)

    def remove(self, request: EngineRequest) -> None:
        """Take `request` out (ValueError when it is not queued)."""
        self._requests.remove(request)
        self._count(request, -1)

    def take_all(self) -> list[EngineRequest]:
        """Empty the queue; returns what waited, oldest first."""
        taken = list(self._requests)
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
