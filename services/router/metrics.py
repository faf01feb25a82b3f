"""The router's Prometheus metrics and the gateway's aggregated /metrics.

The router's own: each replica's health and open streams, and routing decisions and
retries by policy and replica. The gateway's /metrics adds every replica's metrics
(vllm:* and exegpt:*), fetched over the router's existing channels with
`exegpt.v1.Metrics/GetMetrics` (so the deployment's API key and TLS apply and no
metrics port has to be opened or configured on the workers), each sample labelled with
`replica="host:port"`; `exegpt:replica_metrics_up` says which replicas answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from exegpt.metrics import merge_families, render_families
from exegpt.v1 import metrics_pb2, metrics_pb2_grpc
from services.router.replicas import Replica, ReplicaPool

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0
REPLICA_LABEL = "replica"


class PoolCollector:
    """Replica gauges read from the pool at scrape time."""

    def __init__(self, pool: ReplicaPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "exegpt:replica_healthy",
            "1 while the replica passes its health checks.",
            labels=[REPLICA_LABEL],
        )
        in_flight = GaugeMetricFamily(
            "exegpt:replica_requests_in_flight",
            "Requests the router is streaming from the replica.",
            labels=[REPLICA_LABEL],
        )
        for replica in self._pool.replicas:
            healthy.add_metric([replica.address], 1.0 if replica.healthy else 0.0)
            in_flight.add_metric([replica.address], float(replica.num_in_flight))
        yield healthy
        yield in_flight


class RouterMetrics:
    def __init__(self, pool: ReplicaPool, policy: str) -> None:
        self.registry = CollectorRegistry()
        self._pool = pool
        self._policy = policy
        self.registry.register(PoolCollector(pool))
        self._decisions = Counter(
            "exegpt:router_decisions",
            "Requests (and retries) sent to a replica, by routing policy.",
            ["policy", REPLICA_LABEL],
            registry=self.registry,
        )
        self._retries = Counter(
            "exegpt:router_retries",
            "Requests retried elsewhere after the replica was unavailable before any token.",
            [REPLICA_LABEL],
            registry=self.registry,
        )

    def routed(self, address: str) -> None:
        self._decisions.labels(self._policy, address).inc()

    def retried(self, address: str) -> None:
        self._retries.labels(address).inc()

    async def exposition(self) -> bytes:
        """The router's metrics followed by every replica's, labelled by replica."""
        texts = await asyncio.gather(*(_replica_text(r) for r in self._pool.replicas))
        up = GaugeMetricFamily(
            "exegpt:replica_metrics_up",
            "1 if the replica answered GetMetrics for this scrape.",
            labels=[REPLICA_LABEL],
        )
        sources = []
        for replica, text in zip(self._pool.replicas, texts, strict=True):
            up.add_metric([replica.address], 0.0 if text is None else 1.0)
            if text is not None:
                sources.append((replica.address, text))
        families = [up, *merge_families(sources, REPLICA_LABEL)]
        return generate_latest(self.registry) + render_families(families)


async def _replica_text(replica: Replica) -> str | None:
    stub = metrics_pb2_grpc.MetricsStub(replica.channel)
    try:
        answer = await stub.GetMetrics(metrics_pb2.GetMetricsRequest(), timeout=SCRAPE_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        logger.debug("no metrics from %s: %s", replica.address, exc.code())
        return None
    return answer.text
