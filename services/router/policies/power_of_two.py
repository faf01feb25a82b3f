"""Power of two choices: two healthy replicas at random, the one with fewer requests in
flight (Mitzenmacher): nearly least-loaded balance without every request reading every
replica, and no herd on one replica when the router's counts are stale."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.policies import ReplicaView


class PowerOfTwoPolicy:
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        if len(replicas) == 1:
            return replicas[0]
        first, second = self._random.sample(list(replicas), 2)
        return second if second.num_in_flight < first.num_in_flight else first
