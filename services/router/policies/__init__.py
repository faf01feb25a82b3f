"""Router (level-1) load-balancing policies: a string enum and a registry, one file each."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol


class ReplicaView(Protocol):
    """What a policy may read about a replica."""

    @property
    def address(self) -> str: ...

    @property
    def num_in_flight(self) -> int: ...


class RoutingPolicy(Protocol):
    def choose(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        """Pick one of the (non-empty) healthy replicas for the next request."""
        ...


class RouterPolicy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"


def make_policy(policy: RouterPolicy) -> RoutingPolicy:
    from services.router.policies.round_robin import RoundRobinPolicy

    registry: dict[RouterPolicy, type] = {RouterPolicy.ROUND_ROBIN: RoundRobinPolicy}
    return registry[policy]()
