"""Routing policies choosing on real workers: their loads pushed over gRPC (WatchLoad), the
router's own in-flight counts, and what it sent between two pushes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from exegpt.generation import SamplingParams
from exegpt.sdk import Client
from services.router.policies import RouterPolicy, make_policy
from services.router.replicas import Replica
from services.worker.config import EngineConfig
from services.worker.engine import EngineRequest
from tests.conftest import BackgroundLoop, Stack, start_stack, stop_stack
from tests.wait import wait_until


@pytest.fixture(scope="module")
def token_aware(background_loop: BackgroundLoop) -> Iterator[Stack]:
    configs = [EngineConfig(max_batch_size=1), EngineConfig(max_batch_size=1)]
    stack = start_stack(
        background_loop, configs, policy=RouterPolicy.TOKEN_AWARE, health_check_interval_s=0.1
    )
    yield stack
    stop_stack(stack)


def _replicas(stack: Stack) -> list[Replica]:
    by_address = {r.address: r for r in stack.router.router.pool.replicas}
    return [by_address[w.address] for w in stack.workers]


def _finished(stack: Stack) -> list[int]:
    return [w.engine.stats().num_finished for w in stack.workers]


def test_token_aware_avoids_the_replica_with_the_long_queue(token_aware: Stack) -> None:
    busy = token_aware.workers[0].engine
    ids = [f"queued{i}" for i in range(6)]
    for request_id in ids:  # one running, five queued behind it: thousands of tokens owed
        sampling = SamplingParams(max_tokens=400, ignore_eos=True)
        busy.submit(EngineRequest(request_id, [3, 4, 5], sampling, lambda event: None))
    replicas = _replicas(token_aware)
    wait_until(lambda: replicas[0].load.pushed_tokens > 1000)
    assert replicas[1].outstanding_tokens < replicas[0].outstanding_tokens
    before = _finished(token_aware)
    try:
        with Client(token_aware.grpc_address) as client:
            for _ in range(4):
                assert client.generate([3, 4], max_tokens=3).completion_tokens == 3
        after = _finished(token_aware)
        assert after[1] - before[1] == 4 and after[0] == before[0]
    finally:
        for request_id in ids:
            busy.abort(request_id)
    wait_until(lambda: busy.stats().num_running == busy.stats().num_waiting == 0)


def test_token_aware_counts_what_it_sent_between_two_pushes(token_aware: Stack) -> None:
    replicas = _replicas(token_aware)
    wait_until(lambda: all(r.outstanding_tokens == 0 for r in replicas))
    policy = make_policy(RouterPolicy.TOKEN_AWARE)
    chosen = []
    for _ in range(4):  # no push in between can be relied on: the router's own counts spread
        replica = policy.choose(replicas)
        replica.note_sent(100.0)
        chosen.append(replica.address)
    assert sorted(chosen) == sorted([r.address for r in replicas] * 2)
    for replica in replicas:
        replica.load.unacked.clear()


def test_least_requests_and_power_of_two_avoid_the_replica_with_a_stream_open(
    token_aware: Stack,
) -> None:
    replicas = _replicas(token_aware)
    done = threading.Event()

    def long_request() -> None:
        with Client(token_aware.grpc_address) as client:
            client.generate([3, 4], max_tokens=300, ignore_eos=True)
        done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until(lambda: sum(r.num_in_flight for r in replicas) == 1)
    busy = next(r for r in replicas if r.num_in_flight == 1)
    idle = next(r for r in replicas if r is not busy)
    for policy in (RouterPolicy.LEAST_REQUESTS, RouterPolicy.POWER_OF_TWO):
        chooser = make_policy(policy)
        assert {chooser.choose(replicas).address for _ in range(5)} == {idle.address}, policy
    thread.join(60)
    assert done.is_set()
    # Idle again: least_requests spreads ties evenly.
    chooser = make_policy(RouterPolicy.LEAST_REQUESTS)
    picks = [chooser.choose(replicas).address for _ in range(4)]
    assert picks.count(busy.address) == picks.count(idle.address) == 2
