"""Least requests: the replica with the fewest requests this router has in flight on it
(ties go round robin, so an idle pool is still spread evenly)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from services.router.policies import ReplicaView


class LeastRequestsPolicy:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        ordered = sorted(replicas, key=lambda replica: replica.address)
        fewest = min(replica.num_in_flight for replica in ordered)
        tied = [replica for replica in ordered if replica.num_in_flight == fewest]
        return tied[next(self._counter) % len(tied)]
