"""Prometheus helpers shared by the gateway and the workers (prometheus-client underneath).

Every process keeps its own `CollectorRegistry` (never the global one), so several workers
and a router can share a test process. A worker is one process whose engine thread and
gRPC loop both write to it; its stage processes report their step times back in each step's
result, so no registry spans processes and prometheus-client's multiprocess mode (meant for
forking web servers) is not needed.

`serve_metrics` exposes a registry on its own HTTP port (a worker's `--metrics-port`) with
the deployment's API key and TLS; `merge_families` turns the text of many processes into
one exposition with a label naming each source (the gateway's view of its replicas).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exegpt.security import SecurityConfig, key_matches, server_ssl_context

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


def metrics_response(*texts: bytes) -> web.Response:
    """A /metrics answer holding expositions concatenated (their families must differ)."""
    response = web.Response(body=b"".join(texts))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def merge_families(sources: Iterable[tuple[str, str]], label: str) -> list[Metric]:
    """Parse each (source, exposition text) and join same-named families, every sample
    labelled `label=source`; a text that does not parse is logged and skipped."""
    merged: dict[str, Metric] = {}
    for source, text in sources:
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            logger.warning("metrics of %s do not parse: %s", source, exc)
            continue
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif into.type != family.type:
                logger.warning("%s: %s is a %s elsewhere", source, family.name, into.type)
                continue
            into.samples.extend(
                Sample(s.name, {**s.labels, label: source}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    return list(merged.values())


@dataclass(eq=False)
class StaticCollector:
    """Yields families collected elsewhere (for rendering them with generate_latest)."""

    families: list[Metric]

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render_families(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    return generate_latest(registry)


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, security: SecurityConfig
) -> tuple[web.AppRunner, int]:
    """Serve `registry` at GET /metrics on host:port (0: a free port); returns the runner
    (cleanup() stops it) and the bound port. With an API key, scrapes need
    `Authorization: Bearer KEY` (401 otherwise); with a certificate, HTTPS."""

    async def metrics(request: web.Request) -> web.Response:
        if security.api_key and not key_matches(
            request.headers.get("Authorization"), f"Bearer {security.api_key}"
        ):
            return web.json_response(
                {"error": {"message": "missing or wrong API key", "code": "invalid_api_key"}},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return metrics_response(generate_latest(registry))

    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server_ssl_context(security))
    await site.start()
    bound = runner.addresses[0][1]
    logger.info("metrics on %s://%s:%d%s", security.url_scheme, host, bound, METRICS_PATH)
    return runner, bound
