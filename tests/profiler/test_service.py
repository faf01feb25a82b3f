"""The Profiler gRPC service: real servers on port 0, real grpc.aio channels, real
measurements on a reduced grid (the quick grid takes about two minutes here)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exegpt.profile.format import parse_profile
from exegpt.profile.layer_profile import LayerProfile
from exegpt.v1 import profiler_pb2, profiler_pb2_grpc
from services.profiler.config import ProfilerConfig
from services.profiler.measure.grid import QUICK
from services.profiler.measure.run import CheckedRequest, ProgressEvent
from services.profiler.server import RunningProfiler, start_profiler
from services.profiler.service import default_runner
from tests.conftest import BackgroundLoop
from tests.tiny_profile import TINY_GRID

TIMEOUT_S = 120.0
Events = list[profiler_pb2.ProfileEvent]


def tiny_spec(**overrides: object) -> profiler_pb2.GridSpec:
    fields: dict[str, object] = {
        "batch_sizes": TINY_GRID.batch_sizes,
        "seq_lens_tokens": TINY_GRID.seq_lens_tokens,
        "kv_lens_tokens": TINY_GRID.kv_lens_tokens,
        "num_tokens": TINY_GRID.num_tokens,
        "message_bytes": TINY_GRID.message_bytes,
        "num_warmup": 1,
        "num_repeats": 3,
    }
    fields.update(overrides)
    return profiler_pb2.GridSpec(**fields)  # type: ignore[arg-type]


def tiny_request(**overrides: object) -> profiler_pb2.StartProfileRequest:
    fields: dict[str, object] = {"grid": tiny_spec(), "tp_degrees": [1]}
    fields.update(overrides)
    return profiler_pb2.StartProfileRequest(**fields)  # type: ignore[arg-type]


class Gate:
    """A runner that holds the device until released, then measures for real."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(
        self, checked: CheckedRequest, on_progress: Callable[[ProgressEvent], None]
    ) -> object:
        on_progress(ProgressEvent("waiting at the gate", 0, 1, 0.0))
        self.entered.set()
        assert self.release.wait(TIMEOUT_S)
        return default_runner(checked, on_progress)


def start(
    loop: BackgroundLoop, directory: Path, runner: object = default_runner, **config: object
) -> RunningProfiler:
    options: dict[str, object] = {"port": 0, "profile_dir": str(directory)}
    options.update(config)
    return loop.run(start_profiler(ProfilerConfig(**options), runner=runner))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def profiler(
    background_loop: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProfiler]:
    running = start(background_loop, tmp_path_factory.mktemp("store"))
    yield running
    background_loop.run(running.stop(0.5))


async def collect(
    stub: profiler_pb2_grpc.ProfilerStub, request: object, timeout_s: float = TIMEOUT_S
) -> Events:
    return [event async for event in stub.StartProfile(request, timeout=timeout_s)]


def call(address: str, work: Callable[[profiler_pb2_grpc.ProfilerStub], object]) -> object:
    async def go() -> object:
        async with grpc.aio.insecure_channel(address) as channel:
            return await work(profiler_pb2_grpc.ProfilerStub(channel))  # type: ignore[misc]

    return asyncio.run(go())


def test_health_is_serving(profiler: RunningProfiler) -> None:
    async def check(_: object) -> health_pb2.HealthCheckResponse:
        async with grpc.aio.insecure_channel(profiler.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert call(profiler.address, check).status == health_pb2.HealthCheckResponse.SERVING


def test_start_get_and_list_a_profile(profiler: RunningProfiler) -> None:
    """The quick grid's sizes (one round instead of three, 5 ms samples, TP 1: half a minute
    here, over two minutes on a loaded CI machine; the deadline only guards against a hang)."""
    quick = profiler_pb2.GridSpec(preset="quick", num_rounds=1, min_sample_s=0.005)
    request = profiler_pb2.StartProfileRequest(grid=quick, tp_degrees=[1])
    events: Events = call(profiler.address, lambda s: collect(s, request, 4 * TIMEOUT_S))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and progress[-1].num_done == progress[-1].num_total
    assert all(b.num_done >= a.num_done for a, b in zip(progress, progress[1:], strict=False))
    done = events[-1].done
    assert done.profile_id and done.summary.tp_degrees == [1]
    assert done.summary.model_name == "exegpt-tiny-t5" and done.summary.grid_name == "quick-custom"

    got = call(
        profiler.address,
        lambda s: s.GetProfile(
            profiler_pb2.GetProfileRequest(profile_id=done.profile_id), timeout=TIMEOUT_S
        ),
    )
    profile = LayerProfile(parse_profile(__import__("json").loads(got.profile_json)))
    assert profile.data.profile_id == done.profile_id
    assert profile.data.grid["batch_sizes"] == list(QUICK.batch_sizes)
    assert profile.data.grid["min_sample_s"] == 0.005
    # Measured attention is floored at the kernel alone, so every grid point is positive; a
    # reconciled query may be zero where a noisy one-round forward came in under its parts
    # (exegpt/profile/reconcile.py), so the whole prefill is what must cost time.
    attention = profile.data.compute[1].encode_attention
    assert all(v > 0 for row in attention.rows for v in row.median_s)
    assert profile.prefill_parts_s(8, 512) > 0 and profile.transfer_s(4096) > 0
    assert not profile.is_extrapolated("decode_attention_s", 16, 1000, 1000, 1)
    assert got.summary == done.summary

    listed = call(
        profiler.address,
        lambda s: s.ListProfiles(
            profiler_pb2.ListProfilesRequest(model="exegpt-tiny-t5"), timeout=TIMEOUT_S
        ),
    )
    assert done.profile_id in [p.profile_id for p in listed.profiles]
    assert (profiler.core.store.directory / f"{done.profile_id}.json").is_file()
    other = call(
        profiler.address,
        lambda s: s.ListProfiles(
            profiler_pb2.ListProfilesRequest(model="another-model"), timeout=TIMEOUT_S
        ),
    )
    assert list(other.profiles) == []


def bad_requests() -> list[tuple[profiler_pb2.StartProfileRequest, str]]:
    rows = [
        (tiny_request(model="no-such-model"), "unknown model 'no-such-model'"),
        (tiny_request(model="/etc"), "checkpoint directories under its model roots (none"),
        (tiny_request(grid=profiler_pb2.GridSpec()), "grid batch_sizes is empty"),
        (tiny_request(grid=tiny_spec(seq_lens_tokens=[32, 8])), "strictly increasing"),
        (tiny_request(grid=profiler_pb2.GridSpec(preset="huge")), "unknown grid 'huge'"),
        (tiny_request(grid=tiny_spec(num_tokens=list(range(1, 100)))), "at most 64"),
        (tiny_request(grid=tiny_spec(batch_sizes=[1, 1 << 20])), "this service allows"),
        (tiny_request(grid=tiny_spec(min_sample_s=-0.01)), "min_sample_s must be between 0"),
        (tiny_request(tp_degrees=[3]), "does not divide num_heads=4"),
        (tiny_request(dtype="int4"), "unsupported dtype"),
    ]
    if not torch.cuda.is_available():
        rows.append((tiny_request(device="cuda"), "this machine has no CUDA"))
    return rows


@pytest.mark.parametrize(("request_message", "message"), bad_requests())
def test_bad_input_is_invalid_argument(
    profiler: RunningProfiler, request_message: object, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        call(profiler.address, lambda s: collect(s, request_message))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.value.details() or "")


def test_checkpoints_load_only_from_the_model_roots(
    background_loop: BackgroundLoop, tmp_path: Path, llama_dir: Path
) -> None:
    running = start(background_loop, tmp_path / "store", model_roots=(str(llama_dir.parent),))
    try:
        done = call(running.address, lambda s: collect(s, tiny_request(model=str(llama_dir))))
        assert done[-1].done.summary.model_name == llama_dir.name
        for outside in ("/etc", str(llama_dir / ".." / ".." / "elsewhere")):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                call(running.address, lambda s, m=outside: collect(s, tiny_request(model=m)))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(llama_dir.parent) in (error.value.details() or "")
    finally:
        background_loop.run(running.stop(0.5))


@pytest.mark.parametrize(
    ("profile_id", "code"),
    [
        ("../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("no-such-profile", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_get_profile_errors(profiler: RunningProfiler, profile_id: str, code: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        call(
            profiler.address,
            lambda s: s.GetProfile(
                profiler_pb2.GetProfileRequest(profile_id=profile_id), timeout=TIMEOUT_S
            ),
        )
    assert error.value.code() == code


async def first_event(stream: grpc.aio.UnaryStreamCall) -> profiler_pb2.ProfileEvent:
    event = await asyncio.wait_for(stream.read(), TIMEOUT_S)
    assert event is not grpc.aio.EOF
    return event


async def remaining(stream: grpc.aio.UnaryStreamCall) -> Events:
    events = []
    while (event := await stream.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def test_one_run_per_device_a_bounded_queue_then_resource_exhausted(
    background_loop: BackgroundLoop, tmp_path: Path
) -> None:
    gate = Gate()
    running = start(background_loop, tmp_path, runner=gate, max_queued_per_device=1)

    async def scenario() -> tuple[Events, Events, grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = profiler_pb2_grpc.ProfilerStub(channel)
            first = stub.StartProfile(tiny_request(), timeout=TIMEOUT_S)
            head = [await first_event(first)]  # A holds the device
            await asyncio.to_thread(gate.entered.wait, TIMEOUT_S)
            second = stub.StartProfile(tiny_request(), timeout=TIMEOUT_S)
            queued = await first_event(second)  # B waits behind A
            assert queued.queued.position == 1 and queued.queued.device == "cpu"
            with pytest.raises(grpc.aio.AioRpcError) as third:  # C finds the queue full
                await collect(stub, tiny_request())
            gate.release.set()
            rest_a = await remaining(first)
            events_b = [queued, *await remaining(second)]
            return head + rest_a, events_b, third.value

    try:
        events_a, events_b, refused = background_loop.run(scenario(), timeout_s=2 * TIMEOUT_S)
    finally:
        gate.release.set()
        background_loop.run(running.stop(0.5))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cpu is busy profiling" in (refused.details() or "")
    assert events_a[-1].HasField("done") and events_b[-1].HasField("done")
    assert events_a[-1].done.profile_id != events_b[-1].done.profile_id
    # B only started measuring once A had finished.
    assert [e.WhichOneof("event") for e in events_b][:2] == ["queued", "progress"]
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_no_queue_means_resource_exhausted_at_once(
    background_loop: BackgroundLoop, tmp_path: Path
) -> None:
    gate = Gate()
    running = start(background_loop, tmp_path, runner=gate, max_queued_per_device=0)

    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = profiler_pb2_grpc.ProfilerStub(channel)
            first = stub.StartProfile(tiny_request(), timeout=TIMEOUT_S)
            await first_event(first)
            await asyncio.to_thread(gate.entered.wait, TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(stub, tiny_request())
            first.cancel()
            return refused.value

    try:
        refused = background_loop.run(scenario())
    finally:
        gate.release.set()
        background_loop.run(running.stop(0.5))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_cancelled_run_frees_the_device_and_stores_nothing(
    background_loop: BackgroundLoop, tmp_path: Path
) -> None:
    gate = Gate()
    running = start(background_loop, tmp_path, runner=gate, max_queued_per_device=0)

    async def scenario() -> Events:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = profiler_pb2_grpc.ProfilerStub(channel)
            first = stub.StartProfile(tiny_request(), timeout=TIMEOUT_S)
            await first_event(first)
            await asyncio.to_thread(gate.entered.wait, TIMEOUT_S)
            first.cancel()
            gate.release.set()  # the run stops at its next progress report
            for _ in range(200):
                if running.core.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            gate.entered.clear()
            return await collect(stub, tiny_request())

    try:
        events = background_loop.run(scenario(), timeout_s=2 * TIMEOUT_S)
    finally:
        gate.release.set()
        background_loop.run(running.stop(0.5))
    assert events[-1].HasField("done")
    assert not any(e.HasField("queued") for e in events)
    assert [p.stem for p in tmp_path.glob("*.json")] == [events[-1].done.profile_id]
