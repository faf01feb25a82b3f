"""API keys on every interface: HTTP 401 / gRPC UNAUTHENTICATED without the key, health open.

Every service gets the key from EXEGPT_API_KEY (as `exegpt up` hands it down), so the router
reaching its worker proves internal clients send it too.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exegpt.sdk import Client
from exegpt.sdk.types import ExegptError
from tests.reliability.procs import router_addresses, services

KEY = "test-key-0123456789"
ENV = {"EXEGPT_API_KEY": KEY}
COMPLETION = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"


def unary(address: str, method: str, payload: bytes, key: str | None) -> grpc.StatusCode:
    """Status of a generic unary call (raw bytes in and out) with or without a key."""
    metadata = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        try:
            call(payload, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def report_workload(address: str, key: str | None) -> grpc.StatusCode:
    """A client-streaming call (Scheduler.ReportWorkload) with one empty report."""
    metadata = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary("/exegpt.v1.Scheduler/ReportWorkload")
        try:
            call(iter([b""]), timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
    return response.status


def test_http_needs_the_bearer_key_and_health_stays_open(tmp_path: Path) -> None:
    with services(tmp_path, ENV) as group:
        worker = group.worker("worker")
        _, http_url = router_addresses(group.router([worker.ready]))

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.post(
                f"{http_url}/v1/completions", json=COMPLETION, headers=headers, timeout=30
            )
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(f"{http_url}/v1/models", timeout=30).status_code == 401

        health = httpx.get(f"{http_url}/health", timeout=30)
        assert health.status_code == 200, health.text  # open: load balancers probe it
        good = {"Authorization": f"Bearer {KEY}"}
        ok = httpx.post(f"{http_url}/v1/completions", json=COMPLETION, headers=good, timeout=30)
        assert ok.status_code == 200, ok.text  # and the router's calls to its worker carry it
        assert ok.json()["usage"]["completion_tokens"] == 3
        models = httpx.get(f"{http_url}/v1/models", headers=good, timeout=30)
        assert models.status_code == 200 and models.json()["data"]


def test_every_grpc_service_needs_the_key(tmp_path: Path) -> None:
    with services(tmp_path, ENV) as group:
        worker = group.worker("worker")
        router_grpc, _ = router_addresses(group.router([worker.ready]))
        scheduler = group.start("scheduler", "services.scheduler", ["--port", "0"])
        profile_dir = str(tmp_path / "profiles")
        profiler = group.start(
            "profiler", "services.profiler", ["--port", "0", "--profile-dir", profile_dir]
        )
        stage = group.start("stage", "services.worker.stage", ["--port", "0"])
        calls = {
            router_grpc: "/exegpt.v1.Router/ListModels",
            worker.ready: "/exegpt.v1.Worker/GetStats",
            scheduler.ready: "/exegpt.v1.Scheduler/Plan",
            profiler.ready: "/exegpt.v1.Profiler/ListProfiles",
            stage.ready: "/exegpt.v1.Stage/GetStats",
        }
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        for address, method in calls.items():
            assert unary(address, method, b"", None) is unauthenticated, method
            assert unary(address, method, b"", "wrong") is unauthenticated, method
            # Bytes of an unauthenticated call are never parsed.
            assert unary(address, method, GARBAGE, None) is unauthenticated, method
            assert unary(address, method, b"", KEY) is not unauthenticated, method
            assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        assert report_workload(scheduler.ready, None) is unauthenticated
        assert report_workload(scheduler.ready, KEY) is grpc.StatusCode.OK
        assert unary(stage.ready, "/exegpt.v1.Stage/Stop", b"", None) is unauthenticated
        assert unary(stage.ready, "/exegpt.v1.Stage/GetStats", b"", KEY) is grpc.StatusCode.OK


def test_sdk_sends_the_key(tmp_path: Path) -> None:
    with services(tmp_path, ENV) as group:
        worker = group.worker("worker")
        router_grpc, _ = router_addresses(group.router([worker.ready]))
        with Client(router_grpc, api_key=KEY, timeout_s=60) as client:
            completion = client.generate([3, 4, 5], max_tokens=4, ignore_eos=True)
            assert len(completion.token_ids) == 4
            assert sum(len(c.token_ids) for c in client.stream([3, 4], max_tokens=3)) <= 3
        with Client(router_grpc, api_key="wrong", timeout_s=60) as client:
            with pytest.raises(ExegptError) as refused:
                client.generate([3, 4, 5], max_tokens=2)
        assert refused.value.code == "unauthenticated"
