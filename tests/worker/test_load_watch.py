"""Worker.WatchLoad over a real gRPC server: a push at once, on every queue change (coalesced
to at most one per 50 ms), the requests accepted from the watching router, a clean end when
the worker shuts down, and a bound on watchers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from exegpt.generation import SamplingParams
from exegpt.models.loader import load_model
from exegpt.serving import ROUTER_ID_METADATA
from exegpt.v1 import generate_pb2, worker_pb2, worker_pb2_grpc
from services.worker.config import EngineConfig, WorkerConfig
from services.worker.engine import EngineRequest
from services.worker.load_watch import MIN_PUSH_INTERVAL_S, LoadBoard, TooManyWatchersError
from services.worker.server import RunningWorker, start_worker
from tests.conftest import BackgroundLoop


@pytest.fixture()
def worker(background_loop: BackgroundLoop) -> Iterator[RunningWorker]:
    config = WorkerConfig(port=0, engine=EngineConfig(max_batch_size=1, max_queue_size=64))
    running = background_loop.run(start_worker(config, load_model("exegpt-tiny-t5")))
    yield running
    background_loop.run(running.stop(0.5))


def _watch(address: str, router_id: str = "r1") -> tuple[grpc.Channel, Iterator]:
    channel = grpc.insecure_channel(address)
    stub = worker_pb2_grpc.WorkerStub(channel)
    return channel, stub.WatchLoad(worker_pb2.WatchLoadRequest(router_id=router_id), timeout=60)


def _submit(worker: RunningWorker, request_id: str, max_tokens: int = 200) -> None:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    worker.engine.submit(EngineRequest(request_id, [3, 4, 5, 6], sampling, lambda event: None))


def _next_until(stream: Iterator, predicate) -> worker_pb2.LoadUpdate:
    for update in stream:
        if predicate(update):
            return update
    raise AssertionError("the stream ended before the condition held")


def test_pushes_at_once_then_on_queue_changes(worker: RunningWorker) -> None:
    channel, stream = _watch(worker.address)
    with channel:
        first = next(stream)
        assert (first.num_waiting, first.num_running, first.num_pending_prefill_tokens) == (0, 0, 0)
        assert first.worker_id and first.kv_capacity_bytes > 0
        ids = [f"q{i}" for i in range(4)]
        for request_id in ids:  # one runs, three wait with their 4-token prompts
            _submit(worker, request_id)
        loaded = _next_until(stream, lambda u: u.num_waiting == 3 and u.num_running == 1)
        # The three waiting prompts are pending, and the running one's too while its prefill
        # is in flight (it has generated nothing: all 4 x 200 tokens are still owed).
        prefilling = loaded.num_remaining_decode_tokens == 4 * 200
        assert loaded.num_pending_prefill_tokens == 3 * 4 + (4 if prefilling else 0)
        # Before anything finished, the decode tokens owed are the max_tokens of each.
        assert loaded.num_remaining_decode_tokens > 3 * 190
        for request_id in ids:
            worker.engine.abort(request_id)
        idle = _next_until(stream, lambda u: u.num_waiting == u.num_running == 0)
        assert idle.num_pending_prefill_tokens == idle.num_remaining_decode_tokens == 0
        assert idle.worker_id == first.worker_id
        stream.cancel()


def test_a_burst_of_changes_is_coalesced_to_one_push_per_interval(worker: RunningWorker) -> None:
    channel, stream = _watch(worker.address)
    with channel:
        next(stream)
        arrivals: list[float] = []
        done = threading.Event()

        def read() -> None:
            for _ in stream:
                arrivals.append(time.monotonic())
                if done.is_set():
                    return

        reader = threading.Thread(target=read)
        reader.start()
        ids = [f"burst{i}" for i in range(40)]
        for request_id in ids:  # 40 queue changes as fast as the engine takes them
            _submit(worker, request_id, max_tokens=50)
        for request_id in ids:
            worker.engine.abort(request_id)
        deadline = time.monotonic() + 30
        while worker.engine.stats().num_waiting + worker.engine.stats().num_running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        done.set()
        reader.join(5)
        stream.cancel()
    assert len(arrivals) >= 2
    assert len(arrivals) < 40, "every change pushed separately instead of coalescing"


def test_pushes_to_one_watcher_are_at_least_the_interval_apart(
    background_loop: BackgroundLoop, worker: RunningWorker
) -> None:
    async def push_times() -> list[float]:
        board = LoadBoard(worker.engine)
        stream = board.watch("r1")
        times = []
        try:
            for i in range(6):  # each push waits for a change, then for the interval
                await anext(stream)
                times.append(time.monotonic())
                _submit(worker, f"c{i}", max_tokens=50)
        finally:
            board.close()
            await stream.aclose()
            for i in range(6):
                worker.engine.abort(f"c{i}")
        return times

    times = background_loop.run(push_times())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) == 5 and min(gaps) >= MIN_PUSH_INTERVAL_S * 0.95, gaps


def test_pushes_count_the_requests_accepted_from_the_watching_router(
    worker: RunningWorker,
) -> None:
    channel, stream = _watch(worker.address, router_id="router-a")
    with channel:
        assert next(stream).num_accepted == 0
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = generate_pb2.GenerateRequest(
            token_ids=generate_pb2.TokenIds(ids=[3, 4]),
            sampling=generate_pb2.SamplingParams(max_tokens=2),
        )
        for router_id in ("router-a", "router-a", "router-b"):
            list(stub.Generate(request, metadata=((ROUTER_ID_METADATA, router_id),), timeout=30))
        _next_until(stream, lambda u: u.num_accepted == 2)
        stream.cancel()


def test_the_stream_ends_cleanly_when_the_worker_stops(
    background_loop: BackgroundLoop, worker: RunningWorker
) -> None:
    channel, stream = _watch(worker.address)
    with channel:
        next(stream)
        background_loop.run(worker.stop(30.0))  # far longer than the stream may linger
        remaining = list(stream)  # ends without an error
        assert all(update.worker_id for update in remaining)
        assert stream.code() is grpc.StatusCode.OK


def test_watchers_are_bounded(background_loop: BackgroundLoop, worker: RunningWorker) -> None:
    async def second_watcher_refused() -> str:
        board = LoadBoard(worker.engine, max_watchers=1)
        first = board.watch("r1")
        await anext(first)  # one watcher open
        try:
            await anext(board.watch("r2"))
        except TooManyWatchersError as exc:
            return str(exc)
        finally:
            board.close()
            await first.aclose()
        return "accepted"

    assert "at most 1" in background_loop.run(second_watcher_refused())
