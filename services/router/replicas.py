"""The router's view of its replicas: one gRPC channel each, kept fresh by health checks.

For token-aware routing, each replica's load comes from its Worker.WatchLoad stream, plus
what this router sent it since the last push (services/router/load_watch.py).

Each replica also tracks its open streams and when any of them last made progress, so a
watchdog can cancel the streams of a replica that froze or became unreachable. A health check
that times out while the replica's streams keep delivering tokens (it waited behind a burst
of calls) changes nothing; an answer of NOT_SERVING, or a refused connection, still counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exegpt.security import SecurityConfig, aio_channel
from exegpt.serving import channel_options
from exegpt.v1 import generate_pb2, worker_pb2, worker_pb2_grpc
from services.router.load_watch import ReplicaLoad, SentRequest, watch_load

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
# A replica whose health RPC failed this many times in a row is unreachable: its open
# streams are cancelled. One miss on a busy machine is not enough to drop live streams.
UNREACHABLE_AFTER_FAILED_CHECKS = 2
# A failed health check of a replica whose streams delivered a token this recently is not
# counted: a burst queues the check behind thousands of calls, yet the replica is serving.
PROGRESS_PROVES_ALIVE_S = 1.0


def replica_channel_options(
    max_message_bytes: int, max_reconnect_backoff_s: float
) -> list[tuple[str, int]]:
    """Channel options that retry a lost connection at least every max_reconnect_backoff_s.

    gRPC's default backoff grows to 120 s, so a replica back after a long outage was used
    again only tens of seconds after it was ready; health checks drive reconnects instead.
    """
    backoff_ms = max(100, int(max_reconnect_backoff_s * 1000))
    return [
        *channel_options(max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]


@dataclass(eq=False)
class OpenStream:
    """One Generate call in flight on a replica; `stalled` says why the router cancelled it."""

    call: grpc.aio.UnaryStreamCall
    stalled: str | None = None


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    worker: worker_pb2_grpc.WorkerStub
    healthy: bool = False
    model_info: generate_pb2.ModelInfo | None = None
    num_failed_checks: int = 0
    streams: set[OpenStream] = field(default_factory=set)
    last_progress_s: float = field(default_factory=time.monotonic)
    last_token_s: float = -math.inf  # when a stream of this replica last delivered a chunk
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    _health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    @property
    def outstanding_tokens(self) -> float:
        """Prefill + expected decode tokens owed: the last push plus what was sent since."""
        return self.load.outstanding_tokens

    def note_sent(self, num_tokens: float) -> SentRequest:
        return self.load.sent(num_tokens)

    @property
    def unreachable(self) -> bool:
        return self.num_failed_checks >= UNREACHABLE_AFTER_FAILED_CHECKS

    def open_stream(self, call: grpc.aio.UnaryStreamCall) -> OpenStream:
        if not self.streams:
            # An idle replica has made no progress because it had nothing to do.
            self.last_progress_s = time.monotonic()
        stream = OpenStream(call)
        self.streams.add(stream)
        return stream

    def close_stream(self, stream: OpenStream) -> None:
        self.streams.discard(stream)

    def made_progress(self) -> None:
        self.last_progress_s = self.last_token_s = time.monotonic()

    def streams_progressing(self, within_s: float) -> bool:
        """Whether one of its streams delivered a chunk in the last `within_s` seconds."""
        return time.monotonic() - self.last_token_s <= within_s

    def cancel_streams(self, reason: str) -> int:
        """Cancel every open stream, recording why; returns how many."""
        cancelled = [stream for stream in self.streams if stream.stalled is None]
        for stream in cancelled:
            stream.stalled = reason
            stream.call.cancel()
        return len(cancelled)

    async def check(self, timeout_s: float) -> bool:
        """Ask the replica's health service; fetch its model on first success."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
            healthy = response.status == _SERVING
            if healthy and self.model_info is None:
                self.model_info = await self.worker.GetModelInfo(
                    worker_pb2.GetModelInfoRequest(), timeout=timeout_s
                )
            # NOT_SERVING is a replica draining on purpose: its streams may still finish.
            self.num_failed_checks = 0
        except grpc.aio.AioRpcError as exc:
            # Only a check that timed out behind a burst: a refused or reset connection
            # (a replica restarting) counts whatever its streams did a moment ago.
            timed_out = exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            if timed_out and self.streams_progressing(max(timeout_s, PROGRESS_PROVES_ALIVE_S)):
                logger.info(
                    "replica %s missed a health check (%s) but its streams progress: busy, "
                    "not down", self.address, exc.code().name,
                )  # fmt: skip
                return self.healthy
            healthy = False
            self.num_failed_checks += 1
        if healthy != self.healthy:
            logger.info("replica %s is %s", self.address, "healthy" if healthy else "unhealthy")
        self.healthy = healthy
        return healthy


class ReplicaPool:
    def __init__(
        self,
        addresses: tuple[str, ...],
        max_message_bytes: int,
        max_reconnect_backoff_s: float = 1.0,
        security: SecurityConfig | None = None,
    ) -> None:
        options = replica_channel_options(max_message_bytes, max_reconnect_backoff_s)
        security = security or SecurityConfig()
        self.replicas = [
            Replica(
                address,
                channel := aio_channel(address, security, options),
                worker_pb2_grpc.WorkerStub(channel),
            )
            for address in addresses
        ]
        self._task: asyncio.Task[None] | None = None
        self._watches: list[asyncio.Task[None]] = []

    def healthy(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.healthy]

    def models(self) -> list[generate_pb2.ModelInfo]:
        """The distinct models served by healthy replicas."""
        seen: dict[str, generate_pb2.ModelInfo] = {}
        for replica in self.healthy():
            if replica.model_info is not None:
                seen.setdefault(replica.model_info.name, replica.model_info)
        return list(seen.values())

    async def check_all(self, timeout_s: float = 1.0) -> None:
        await asyncio.gather(*(replica.check(timeout_s) for replica in self.replicas))

    def mark_unhealthy(self, replica: Replica) -> None:
        if replica.healthy:
            logger.warning("replica %s failed a request; marking it unhealthy", replica.address)
        replica.healthy = False

    async def wait_for_healthy(self, timeout_s: float) -> list[Replica]:
        """Healthy replicas, waiting up to timeout_s for one to appear."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (healthy := self.healthy()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self.check_all(timeout_s=min(1.0, remaining))
            if not self.healthy():
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
        return healthy

    def start(self, interval_s: float, watch_load_as: str | None = None) -> None:
        """Check health every interval_s; with a router id, also watch every replica's load
        (reopening a stream that ended at most every interval_s)."""
        self._task = asyncio.create_task(self._check_forever(interval_s))
        if watch_load_as is not None:
            self._watches = [
                asyncio.create_task(
                    watch_load(r.address, r.worker, r.load, watch_load_as, min(1.0, interval_s))
                )
                for r in self.replicas
            ]

    async def _check_forever(self, interval_s: float) -> None:
        while True:
            await self.check_all(timeout_s=min(1.0, interval_s))
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        tasks = [task for task in (self._task, *self._watches) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(replica.channel.close() for replica in self.replicas))
