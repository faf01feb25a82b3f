"""The router's replica loads: what it sent between two pushes, the pushes' acknowledgements,
token-aware choices from pushed loads, and the stream reopened across a worker restart."""

from __future__ import annotations

import itertools

from exegpt.models.loader import load_model
from exegpt.v1 import worker_pb2
from services.router import load_watch
from services.router.load_watch import ReplicaLoad
from services.router.policies import RouterPolicy, make_policy
from services.worker.config import EngineConfig, WorkerConfig
from services.worker.server import start_worker
from tests.conftest import BackgroundLoop, start_stack, stop_stack
from tests.wait import wait_until


def _push(tokens: int, accepted: int, worker_id: str = "w1") -> worker_pb2.LoadUpdate:
    return worker_pb2.LoadUpdate(
        num_pending_prefill_tokens=tokens // 2,
        num_remaining_decode_tokens=tokens - tokens // 2,
        num_accepted=accepted,
        worker_id=worker_id,
    )


def test_requests_sent_between_pushes_count_until_a_push_acknowledges_them() -> None:
    load = ReplicaLoad()
    load.pushed(_push(100, accepted=0))
    for tokens in (10.0, 20.0, 40.0):
        load.sent(tokens)
    assert load.outstanding_tokens == 100 + 10 + 20 + 40
    # The replica accepted the first two: the push's load holds them, the third is still ours.
    load.pushed(_push(130, accepted=2))
    assert load.outstanding_tokens == 130 + 40
    load.pushed(_push(170, accepted=3))
    assert load.outstanding_tokens == 170 and not load.unacked


def test_a_refused_request_is_dropped_and_a_finished_one_owes_nothing() -> None:
    load = ReplicaLoad()
    load.pushed(_push(0, accepted=0))
    refused, finished, running = load.sent(5.0), load.sent(7.0), load.sent(11.0)
    load.settled(refused, streamed=False)  # never accepted: no push will ever count it
    load.settled(finished, streamed=True)  # accepted and done before any push
    assert load.outstanding_tokens == 11
    load.pushed(_push(11, accepted=2))  # acknowledges `finished` and `running`, in order
    assert load.outstanding_tokens == 11 and not load.unacked
    assert running not in load.unacked


def test_a_new_worker_id_restarts_the_counts() -> None:
    load = ReplicaLoad()
    load.pushed(_push(50, accepted=7, worker_id="old"))
    load.sent(30.0)
    load.pushed(_push(0, accepted=0, worker_id="new"))  # restarted: the old process is gone
    assert load.outstanding_tokens == 0 and load.num_acked == 0
    load.sent(9.0)
    load.pushed(_push(9, accepted=1, worker_id="new"))
    assert load.outstanding_tokens == 9 and not load.unacked


def test_token_aware_chooses_the_least_pushed_load_plus_what_was_sent() -> None:
    class View:
        def __init__(self, address: str, load: ReplicaLoad) -> None:
            self.address, self.load, self.num_in_flight = address, load, 0

        @property
        def outstanding_tokens(self) -> float:
            return self.load.outstanding_tokens

    a, b = View("a", ReplicaLoad()), View("b", ReplicaLoad())
    a.load.pushed(_push(1000, accepted=0))
    b.load.pushed(_push(400, accepted=0))
    policy = make_policy(RouterPolicy.TOKEN_AWARE)
    picks = []
    for _ in range(4):  # b until what was sent to it passes a's pushed load
        chosen = policy.choose([a, b])
        chosen.load.sent(250.0)
        picks.append(chosen.address)
    assert picks == ["b", "b", "b", "a"]


def test_token_aware_reads_each_load_once_while_sent_requests_expire(monkeypatch) -> None:
    """A burst's unacknowledged requests expire while the policy compares loads: a second
    reading lower than the first minimum once matched no replica (ZeroDivisionError)."""
    clock = iter(itertools.count(2.0, 1.0))  # every reading of the clock is a second later
    monkeypatch.setattr(load_watch.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(load_watch, "MAX_UNACKED_S", 2.5)

    class View:
        def __init__(self, address: str) -> None:
            self.address, self.load, self.num_in_flight = address, ReplicaLoad(), 0

        @property
        def outstanding_tokens(self) -> float:
            return self.load.outstanding_tokens

    a, b = View("a"), View("b")
    a.load.sent(100.0).sent_s = 0.0
    b.load.sent(100.0).sent_s = 1.0
    policy = make_policy(RouterPolicy.TOKEN_AWARE)
    for _ in range(3):
        assert policy.choose([a, b]) in (a, b)


def test_the_router_watches_again_after_a_replica_restarts(
    background_loop: BackgroundLoop,
) -> None:
    stack = start_stack(
        background_loop,
        [EngineConfig(max_batch_size=2)],
        policy=RouterPolicy.TOKEN_AWARE,
        health_check_interval_s=0.1,
    )
    try:
        replica = stack.router.router.pool.replicas[0]
        wait_until(lambda: replica.load.connected)
        first_id = replica.load.worker_id
        old = stack.workers[0]
        port = int(old.address.rsplit(":", 1)[1])
        background_loop.run(old.stop(0.5))
        wait_until(lambda: not replica.load.connected)
        config = WorkerConfig(port=port, engine=EngineConfig(max_batch_size=2))
        stack.workers[0] = background_loop.run(start_worker(config, load_model("exegpt-tiny-t5")))
        wait_until(lambda: replica.load.connected and replica.load.worker_id != first_id)
    finally:
        stop_stack(stack)
