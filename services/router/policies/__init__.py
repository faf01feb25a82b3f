"""Router (level-1) load-balancing policies: a string enum and a registry, one file each.

- round_robin: each healthy replica in turn.
- least_requests: the replica with the fewest requests this router has in flight on it.
- power_of_two: two healthy replicas at random, the one with fewer in flight.
- token_aware: the least outstanding work: the replica's queued prefill tokens plus the
  expected decode tokens still owed to its requests (pushed by its Worker.WatchLoad stream),
  plus what this router sent it since that push.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol


class ReplicaView(Protocol):
    """What a policy may read about a replica."""

    @property
    def address(self) -> str: ...

    @property
    def num_in_flight(self) -> int: ...

    @property
    def outstanding_tokens(self) -> float: ...


class RoutingPolicy(Protocol):
    def choose(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        """Pick one of the (non-empty) healthy replicas for the next request."""
        ...


class RouterPolicy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUESTS = "least_requests"
    POWER_OF_TWO = "power_of_two"
    TOKEN_AWARE = "token_aware"


def make_policy(policy: RouterPolicy) -> RoutingPolicy:
    from services.router.policies.least_requests import LeastRequestsPolicy
    from services.router.policies.power_of_two import PowerOfTwoPolicy
    from services.router.policies.round_robin import RoundRobinPolicy
    from services.router.policies.token_aware import TokenAwarePolicy

    registry: dict[RouterPolicy, Callable[[], RoutingPolicy]] = {
        RouterPolicy.ROUND_ROBIN: RoundRobinPolicy,
        RouterPolicy.LEAST_REQUESTS: LeastRequestsPolicy,
        RouterPolicy.POWER_OF_TWO: PowerOfTwoPolicy,
        RouterPolicy.TOKEN_AWARE: TokenAwarePolicy,
    }
    return registry[policy]()
