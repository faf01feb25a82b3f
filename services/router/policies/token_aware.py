"""Token-aware least load: the replica with the least outstanding work, in tokens.

A replica's work is its queued prefill tokens plus the expected decode tokens still owed to
its requests, as its worker last pushed them (Worker.WatchLoad; the worker predicts decode
tokens from the output lengths it observed, conditioned on the tokens generated so far),
plus the prompt and max_tokens of every request this router sent it that no push counted
yet. Ties go to the replica with fewer requests in flight, then round robin.

Each replica's load is read once per choice: it moves while it is read (unacknowledged
requests expire with time), so comparing a second reading against the first minimum could
match no replica at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from services.router.policies import ReplicaView


class TokenAwarePolicy:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        ordered = sorted(replicas, key=lambda replica: replica.address)
        loads = [(r.outstanding_tokens, r.num_in_flight) for r in ordered]
        least = min(loads)
        tied = [r for r, load in zip(ordered, loads, strict=True) if load == least]
        return tied[next(self._counter) % len(tied)]
