"""What every gRPC service shares: server options, health, binding, ready files, shutdown."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exegpt import tracing
from exegpt.security import AuthInterceptor, SecurityConfig, server_credentials

logger = logging.getLogger(__name__)

# Generate metadata naming the router that sent a request: a worker's WatchLoad pushes count
# the requests it accepted from the watching router (Worker.WatchLoad in worker.proto).
ROUTER_ID_METADATA = "exegpt-router-id"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# gRPC core's backlog of calls not yet picked up by the application: past the soft limit it
# drops calls at random, past the hard limit every call, and a dropped call reaches its
# client as a bare CANCELLED that the handler never saw.
GRPC_PENDING_SOFT_LIMIT = 1000
GRPC_PENDING_HARD_LIMIT = 3000
GRPC_INT_MAX = 2**31 - 1  # gRPC's channel arguments are C ints


def pending_call_options(max_pending_calls: int | None) -> list[tuple[str, int]]:
    """Server options so that a burst of `max_pending_calls` calls arriving at once all
    reach the handlers (which refuse what their own bounded queue cannot take, explicitly),
    instead of gRPC dropping some before any handler ran; None keeps gRPC's limits."""
    if max_pending_calls is None:
        return []
    soft = min(max(GRPC_PENDING_SOFT_LIMIT, max_pending_calls), GRPC_INT_MAX)
    hard = min(max(GRPC_PENDING_HARD_LIMIT, 4 * soft), GRPC_INT_MAX)
    return [
        ("grpc.server.max_pending_requests", soft),
        ("grpc.server.max_pending_requests_hard_limit", hard),
    ]


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


class ClosableCore(Protocol):
    async def close(self) -> None: ...


CoreT = TypeVar("CoreT", bound=ClosableCore)


@dataclass
class RunningService(Generic[CoreT]):
    """A started service: its gRPC server and its grpc-free core, stopped together.

    Stopping reports NOT_SERVING first, then closes the core (ending its streams and any
    running work between two steps) so the grace period is not spent waiting on them.
    """

    grpc_server: GrpcServer
    core: CoreT
    stopped: bool = False

    @property
    def address(self) -> str:
        return self.grpc_server.address

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.grpc_server.set_serving(False)
        await self.core.close()
        await self.grpc_server.server.stop(grace_s)


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it."""


_MALFORMED = _Malformed()
_MALFORMED_MESSAGE = "malformed request: the bytes are not a valid protobuf message"


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _MALFORMED

    return parse


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if request is _MALFORMED:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED_MESSAGE)


async def _checked_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse_malformed(request, context)
        yield request


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, answering INVALID_ARGUMENT to bytes that are not its request type
    (grpc's own answer is UNKNOWN with a Python exception in the message)."""
    deserializer = _safe_deserializer(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _refuse_malformed(request, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _refuse_malformed(request, context)
            result = inner_us(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a handler that writes with context.write()
                await result

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            return await inner_su(_checked_stream(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: Any) -> Any:
        result = inner_ss(_checked_stream(requests, context), context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:
            await result

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Every method of the server refuses unparsable requests with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guard(handler)


async def start_grpc_server(
    register: Callable[[grpc.aio.Server], None],
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    security: SecurityConfig | None = None,
    require_client_cert: bool = True,
    max_pending_calls: int | None = None,
) -> GrpcServer:
    """Start a grpc.aio server with the standard health service; port 0 picks a free port.

    `max_pending_calls` raises gRPC's own backlog of calls that arrived but that this
    process's event loop has not picked up yet (`pending_call_options`).

    With `security`, calls need its API key (health checks excepted) and the server speaks
    TLS when given a certificate, asking for client certificates signed by its CA when it
    has one and `require_client_cert` (internal services; the router's public port not).
    """
    security = security or SecurityConfig()
    interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
    if security.api_key:
        interceptors.insert(0, AuthInterceptor(security.api_key))
    options = [*channel_options(max_message_bytes), *pending_call_options(max_pending_calls)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(security, require_client_cert)
    if credentials is None:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    else:
        bound_port = server.add_secure_port(f"{host}:{port}", credentials)
    if bound_port == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    running = GrpcServer(server, health_servicer, host, bound_port)
    await running.set_serving(True)
    return running


def write_ready_file(path: str | None, address: str) -> None:
    """Atomically publish "host:port" so a launcher can find a server started on port 0."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(address)
    tmp.replace(target)


SUPERVISOR_PID_ENV = "EXEGPT_SUPERVISOR_PID"


def supervisor_environment() -> dict[str, str]:
    """What a supervisor (`exegpt up`) puts in its children's environment so that they stop
    when it dies; a service started by hand outlives the shell that started it."""
    return {SUPERVISOR_PID_ENV: str(os.getpid())}


async def wait_for_shutdown_signal() -> None:
    """Return on SIGINT/SIGTERM, or when the supervisor that started this process is gone."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    supervisor_pid = int(supervisor) if supervisor.isdigit() else None
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            if supervisor_pid is not None and os.getppid() != supervisor_pid:
                logger.warning("supervisor %d is gone; shutting down", supervisor_pid)
                return


def run_service(
    name: str,
    serve: Callable[[], Awaitable[None]],
    errors: tuple[type[Exception], ...] = (ValueError, OSError),
) -> int:
    """Run a service until it is told to stop; the exit code for its `run(args)`.

    Tracing is configured from the standard OTEL_* variables first. A bad configuration or
    an address that cannot be bound (`errors`) is logged in one line and exits 1.
    """
    tracing.configure_tracing(f"exegpt-{name}", tracing.exporter_from_environment())
    try:
        asyncio.run(serve())
    except errors as exc:
        logger.error("%s failed to start: %s", name, exc)
        return 1
    return 0
