"""OTEL_EXPORTER_OTLP_ENDPOINT alone makes a real router and worker export their spans over
OTLP/gRPC: a receiver implementing the OTLP TraceService (opentelemetry-proto) runs here on
127.0.0.1, and one request's spans arrive from both processes in one trace."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from exegpt import tracing
from tests.reliability.procs import router_addresses, services, wait_until


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps (service.name, span name, trace id) of every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (gRPC method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = resource_spans.resource.attributes
                service = next(
                    (a.value.string_value for a in resource if a.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, s.name, s.trace_id) for s in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[str, str, bytes]]:
        with self._lock:
            return list(self.spans)


@pytest.fixture()
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_exporter_follows_the_standard_variables() -> None:
    assert tracing.exporter_from_environment({}) == "none"
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert tracing.exporter_from_environment(endpoint) == "otlp"
    both = {**endpoint, "OTEL_TRACES_EXPORTER": "none"}
    assert tracing.exporter_from_environment(both) == "none"


def test_spans_reach_an_otlp_receiver(receiver: tuple[Receiver, int], tmp_path: Path) -> None:
    collected, port = receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not 5 s
    }
    with services(tmp_path, env=env) as group:
        worker = group.worker("worker")
        router = group.router([worker.ready])
        _, http_url = router_addresses(router)
        answer = httpx.post(
            f"{http_url}/v1/completions",
            json={"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text

        def gateway_trace() -> set[tuple[str, str]]:
            spans = collected.snapshot()
            roots = [t for service, name, t in spans if name == "gateway.completions"]
            if not roots:
                return set()
            return {(service, name) for service, name, t in spans if t == roots[0]}

        wanted = {
            ("exegpt-router", "gateway.completions"),
            ("exegpt-router", "router.generate"),
            ("exegpt-worker", "worker.generate"),
            ("exegpt-worker", "worker.decode"),
        }
        wait_until(lambda: wanted <= gateway_trace(), 30, "the request's spans at the receiver")
