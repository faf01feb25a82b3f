"""Routing across replicas: round robin over healthy ones, retry before the first token."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

from exegpt.sdk import Client
from services.router.policies import RouterPolicy
from services.worker.config import EngineConfig
from tests.conftest import BackgroundLoop, Stack, start_stack, stop_stack
from tests.wait import wait_until


@contextlib.contextmanager
def _one_replica_serving(
    loop: BackgroundLoop, monkeypatch: pytest.MonkeyPatch, generate: Callable
) -> Iterator[str]:
    """A router over one real worker whose Generate is `generate` (a misbehaving replica);
    yields the router's gRPC address."""
    from services.worker.server import WorkerServicer

    monkeypatch.setattr(WorkerServicer, "Generate", generate)
    stack = start_stack(loop, [EngineConfig()], policy=RouterPolicy.ROUND_ROBIN)
    try:
        yield stack.grpc_address
    finally:
        stop_stack(stack)


def _dead_address() -> str:
    """An address with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def two_replicas(background_loop: BackgroundLoop) -> Iterator[Stack]:
    stack = start_stack(
        background_loop, [EngineConfig(), EngineConfig()], policy=RouterPolicy.ROUND_ROBIN
    )
    yield stack
    stop_stack(stack)


def test_round_robin_spreads_requests_evenly(two_replicas: Stack) -> None:
    before = [w.engine.stats().num_finished for w in two_replicas.workers]
    with Client(two_replicas.grpc_address) as client:
        for _ in range(6):
            client.generate([3, 4], max_tokens=2)
    after = [w.engine.stats().num_finished for w in two_replicas.workers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]


def test_dead_replica_is_skipped_and_requests_still_succeed(
    background_loop: BackgroundLoop, two_replicas: Stack
) -> None:
    from services.router.config import RouterConfig
    from services.router.server import start_router

    config = RouterConfig(
        replicas=(_dead_address(), two_replicas.workers[0].address),
        grpc_port=0,
        http_port=0,
        health_check_interval_s=0.2,
    )
    router = background_loop.run(start_router(config))
    try:
        with Client(router.grpc_address) as client:
            for _ in range(4):
                assert client.generate("hi", max_tokens=2).completion_tokens == 2
        assert [r.healthy for r in router.router.pool.replicas] == [False, True]
    finally:
        background_loop.run(router.stop(0.5))


def test_request_retried_on_another_replica_when_the_chosen_one_fails(
    background_loop: BackgroundLoop, two_replicas: Stack
) -> None:
    from services.router.config import RouterConfig
    from services.router.server import start_router

    config = RouterConfig(
        replicas=(_dead_address(), two_replicas.workers[1].address),
        grpc_port=0,
        http_port=0,
        health_check_interval_s=60,
    )
    router = background_loop.run(start_router(config))
    try:
        # Pretend the dead replica passed its last health check: the first attempt fails
        # with UNAVAILABLE before any token, so the router must retry on the live one.
        router.router.pool.replicas[0].healthy = True
        with Client(router.grpc_address) as client:
            for _ in range(2):
                assert client.generate("hi", max_tokens=2).completion_tokens == 2
        assert router.router.pool.replicas[0].healthy is False
    finally:
        background_loop.run(router.stop(0.5))


def test_a_stream_cut_off_without_a_status_is_an_error_not_a_short_success(
    background_loop: BackgroundLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose stream ends OK before the generation's last chunk (as a call cut off
    with its channel does) must not read as a finished generation: the client gets
    UNAVAILABLE with a message, and a request with nothing streamed yet is retried."""
    from exegpt.errors import ErrorCode
    from exegpt.sdk import ExegptError
    from exegpt.v1 import generate_pb2

    async def cut_off(self, request, context):  # one token, then an OK end without finishing
        yield generate_pb2.GenerateChunk(request_id=request.request_id, token_ids=[5])

    with _one_replica_serving(background_loop, monkeypatch, cut_off) as address:
        with Client(address) as client:
            with pytest.raises(ExegptError) as failure:
                client.generate([3, 4], max_tokens=4)
    assert failure.value.code is ErrorCode.UNAVAILABLE
    assert "ended the stream before the generation finished" in failure.value.message


def test_failed_health_checks_of_a_replica_whose_streams_progress_do_not_drop_it(
    two_replicas: Stack,
) -> None:
    """Under a burst a replica's health check waits behind thousands of calls and times
    out, yet its streams deliver tokens: it stays healthy and its streams are not cut.
    Its health checks go to a listener that never answers while its streams flow."""
    import threading

    import grpc
    from grpc_health.v1 import health_pb2_grpc

    router = two_replicas.router.router
    chunks: list[int] = []
    errors: list[Exception] = []

    def consume() -> None:
        with Client(two_replicas.grpc_address) as client:
            try:
                for chunk in client.stream([3, 4], max_tokens=1000, ignore_eos=True):
                    chunks.append(len(chunk.token_ids))
            except Exception as exc:  # noqa: BLE001 (the assertion below shows it)
                errors.append(exc)

    streaming = threading.Thread(target=consume)
    streaming.start()
    wait_until(lambda: sum(chunks) > 0, 30, "the first token")
    (busy,) = [replica for replica in router.pool.replicas if replica.streams]

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"

        async def checks_time_out() -> tuple[bool, bool]:
            channel = grpc.aio.insecure_channel(address)
            answering, busy._health = busy._health, health_pb2_grpc.HealthStub(channel)
            try:
                for _ in range(3):
                    await busy.check(timeout_s=0.2)
                return busy.healthy, busy.unreachable
            finally:
                busy._health = answering
                await channel.close()

        assert two_replicas.loop.run(checks_time_out()) == (True, False)
    streaming.join(60)
    assert not errors, errors
    assert sum(chunks) == 1000


def test_a_call_the_replica_cancels_is_a_refusal_not_the_clients_cancel(
    background_loop: BackgroundLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's backlog of an overloaded worker drops calls as CANCELLED before any handler
    runs; the client never cancelled, so it must not get 499/CANCELLED: unserved it is a
    refusal (RESOURCE_EXHAUSTED, retry later), cut mid-stream it is UNAVAILABLE."""
    import grpc

    from exegpt.errors import ErrorCode
    from exegpt.sdk import ExegptError
    from exegpt.v1 import generate_pb2

    async def dropped(self, request, context):  # cancelled on the replica's side
        if request.sampling.max_tokens > 1:
            yield generate_pb2.GenerateChunk(request_id=request.request_id, token_ids=[5])
        await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")

    with _one_replica_serving(background_loop, monkeypatch, dropped) as address:
        with Client(address) as client:
            with pytest.raises(ExegptError) as unserved:
                client.generate([3, 4], max_tokens=1)
            with pytest.raises(ExegptError) as cut:
                client.generate([3, 4], max_tokens=4)
    assert unserved.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "dropped the call unserved (overloaded); retry later" in unserved.value.message
    assert cut.value.code is ErrorCode.UNAVAILABLE
    assert "cancelled the stream before it finished" in cut.value.message
