"""The router's view of its replicas: one gRPC channel each, kept fresh by health checks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exegpt.serving import channel_options
from exegpt.v1 import generate_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    worker: worker_pb2_grpc.WorkerStub
    healthy: bool = False
    model_info: generate_pb2.ModelInfo | None = None
    num_in_flight: int = 0
    _health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self._health = health_pb2_grpc.HealthStub(self.channel)

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
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != self.healthy:
            logger.info("replica %s is %s", self.address, "healthy" if healthy else "unhealthy")
        self.healthy = healthy
        return healthy


class ReplicaPool:
    def __init__(self, addresses: tuple[str, ...], max_message_bytes: int) -> None:
        options = channel_options(max_message_bytes)
        self.replicas = [
            Replica(
                address,
                channel := grpc.aio.insecure_channel(address, options=options),
                worker_pb2_grpc.WorkerStub(channel),
            )
            for address in addresses
        ]
        self._task: asyncio.Task[None] | None = None

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

    def start(self, interval_s: float) -> None:
        self._task = asyncio.create_task(self._check_forever(interval_s))

    async def _check_forever(self, interval_s: float) -> None:
        while True:
            await self.check_all(timeout_s=min(1.0, interval_s))
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(replica.channel.close() for replica in self.replicas))
