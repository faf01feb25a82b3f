"""Round robin: each request goes to the next healthy replica in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from services.router.policies import ReplicaView


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        ordered = sorted(replicas, key=lambda replica: replica.address)
        return ordered[next(self._counter) % len(ordered)]
