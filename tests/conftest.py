"""Shared fixtures: real services started in-process on port 0, with real channels.

Servers run on a background asyncio loop so tests can use blocking clients (the SDK, the
official openai client, httpx) exactly as users do. A session-wide in-memory span exporter
lets tests look at the traces the services produce.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

T = TypeVar("T")

SPAN_EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPAN_EXPORTER))
trace.set_tracer_provider(_provider)


class BackgroundLoop:
    """An asyncio loop on its own thread; `run()` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class Stack:
    """A router with an HTTP gateway in front of worker replicas, all in this process."""

    loop: BackgroundLoop
    workers: list[Any]
    router: Any

    @property
    def grpc_address(self) -> str:
        return self.router.grpc_address

    @property
    def http_url(self) -> str:
        return self.router.http_url


def start_stack(loop: BackgroundLoop, engine_configs: list[Any], **router_options: Any) -> Stack:
    from exegpt.models.loader import load_model
    from services.router.config import RouterConfig
    from services.router.server import start_router
    from services.worker.config import WorkerConfig
    from services.worker.server import start_worker

    loaded = load_model("exegpt-tiny-t5")
    workers = [
        loop.run(start_worker(WorkerConfig(port=0, engine=engine), loaded))
        for engine in engine_configs
    ]
    config = RouterConfig(
        replicas=tuple(worker.address for worker in workers),
        grpc_port=0,
        http_port=0,
        **router_options,
    )
    router = loop.run(start_router(config))
    return Stack(loop, workers, router)


def stop_stack(stack: Stack) -> None:
    stack.loop.run(stack.router.stop(0.5))
    for worker in stack.workers:
        stack.loop.run(worker.stop(0.5))


@pytest.fixture(scope="session")
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def stack(background_loop: BackgroundLoop) -> Iterator[Stack]:
    """One continuous-batching replica behind the router (shared by most service tests)."""
    from services.worker.config import EngineConfig

    running = start_stack(background_loop, [EngineConfig(max_batch_size=8, max_queue_size=64)])
    yield running
    stop_stack(running)


@pytest.fixture(scope="session")
def gateway_url(stack: Stack) -> str:
    return stack.http_url


@pytest.fixture()
def spans() -> InMemorySpanExporter:
    SPAN_EXPORTER.clear()
    return SPAN_EXPORTER


@pytest.fixture(scope="session")
def measured_tiny_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model really measured at TP 1 on the reduced grid (tests/tiny_profile.py),
    once per session: the scheduler's tests plan and simulate on it."""
    from exegpt.profile.format import write_profile
    from services.profiler.measure.run import run_profile
    from tests.tiny_profile import tiny_request

    data = run_profile(tiny_request(tp_degrees=(1,)))
    return write_profile(data, tmp_path_factory.mktemp("measured") / "tiny.json")


@pytest.fixture(scope="session")
def steady_tiny_profile(
    measured_tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The measured tiny profile's structure with hand-made timings (tests/steady_profile.py):
    plans on it are the same however loaded the machine was while it was measured."""
    from exegpt.profile.format import read_profile, write_profile
    from tests.steady_profile import steady_timings

    data = steady_timings(read_profile(measured_tiny_profile))
    return write_profile(data, tmp_path_factory.mktemp("steady") / "steady-tiny.json")
