"""Hostile HTTP and gRPC input against real router and worker processes: 4xx, never 5xx."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from tests.reliability.procs import Service, Services, router_addresses

DEEP = '{"prompt": "x", "max_tokens": 2, "x": ' + "[" * 5000 + "]" * 5000 + "}"
# (raw body, content type, expected status): each was a 500 or silently accepted before.
HOSTILE_BODIES = {
    "lone surrogate": ('{"prompt": "\\ud800", "max_tokens": 2}', "application/json", 400),
    "max_tokens overflow": ('{"prompt": "x", "max_tokens": 4294967301}', "application/json", 400),
    "nested 5000 deep": (DEEP, "application/json", 400),
    "string temperature": ('{"prompt": "x", "temperature": "0.5"}', "application/json", 400),
    "text/plain body": ('{"prompt": "x", "max_tokens": 2}', "text/plain", 415),
    "form body": ("prompt=x&max_tokens=2", "application/x-www-form-urlencoded", 415),
}
MALFORMED_PROTOBUF = b"\x0a\xff\xff\xff\xff\x0f"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    group = Services(tmp_path_factory.mktemp("hostile"))
    try:
        worker = group.worker("worker")
        yield worker, group.router([worker.ready])
    finally:
        group.close()


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_http_body_gets_a_json_4xx(deployment: tuple[Service, Service], case: str) -> None:
    _, router = deployment
    _, http_url = router_addresses(router)
    body, content_type, status = HOSTILE_BODIES[case]
    response = httpx.post(
        f"{http_url}/v1/completions",
        content=body.encode("utf-8"),
        headers={"Content-Type": content_type},
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["message"]
    ok = httpx.post(f"{http_url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200, ok.text  # still serving


@pytest.mark.parametrize(
    "method", ["/exegpt.v1.Router/Generate", "/exegpt.v1.Router/GenerateStream", "worker"]
)
def test_malformed_protobuf_is_invalid_argument(
    deployment: tuple[Service, Service], method: str
) -> None:
    worker, router = deployment
    address = worker.ready if method == "worker" else router_addresses(router)[0]
    with grpc.insecure_channel(address) as channel:
        if method == "worker":
            call = channel.unary_stream("/exegpt.v1.Worker/Generate")
        elif method.endswith("Stream"):
            call = channel.unary_stream(method)
        else:
            call = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as failure:
            result = call(MALFORMED_PROTOBUF, timeout=10)
            list(result) if not isinstance(result, bytes) else result
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT, failure.value.details()
    assert "malformed request" in (failure.value.details() or "")


def _closed_by_server(sock: socket.socket, drip: bytes, within_s: float) -> bool:
    """Send `drip` a byte at a time, slowly; True once the server closes the connection."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + within_s
    for byte in (drip[i : i + 1] for i in range(len(drip))):
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(byte)
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_slow_http_clients_are_cut_off(tmp_path: Path) -> None:
    group = Services(tmp_path)
    try:
        worker = group.worker("worker")
        flags = ("--http-idle-timeout-s", "2", "--http-body-timeout-s", "2")
        _, http_url = router_addresses(group.router([worker.ready], extra=flags))
        host, port = http_url.removeprefix("http://").rsplit(":", 1)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        with socket.create_connection((host, int(port))) as slow_head:
            assert _closed_by_server(slow_head, head, within_s=20)
        with socket.create_connection((host, int(port))) as slow_body:
            slow_body.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 500\r\n\r\n{"
            )
            slow_body.settimeout(20)
            answer = slow_body.recv(4096)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
        with socket.create_connection((host, int(port))) as idle:
            idle.settimeout(20)
            assert idle.recv(4096) == b""  # nothing sent at all: closed after the timeout
    finally:
        group.close()
