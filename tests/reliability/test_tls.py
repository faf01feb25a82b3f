"""TLS on the gateway and every gRPC server, mutual TLS between services, loopback binding.

Certificates come from a throwaway CA made at test time (tests/reliability/certs.py).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path

import grpc
import httpx
import pytest

from exegpt.sdk import Client
from tests.reliability.certs import Certs, make_certs
from tests.reliability.procs import router_addresses, services
from tests.reliability.test_supervision import launched

KEY = "tls-test-key-42"
COMPLETION = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}


def tls_env(certs: Certs) -> dict[str, str]:
    return {
        "EXEGPT_TLS_CERT": str(certs.server_cert),
        "EXEGPT_TLS_KEY": str(certs.server_key),
        "EXEGPT_TLS_CA": str(certs.ca),
        "EXEGPT_TLS_CLIENT_CERT": str(certs.client_cert),
        "EXEGPT_TLS_CLIENT_KEY": str(certs.client_key),
    }


def worker_call(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            channel.unary_unary("/exegpt.v1.Worker/GetStats")(b"", timeout=15)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_tls_gateway_and_mutual_tls_to_workers(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    with services(tmp_path, tls_env(certs)) as group:
        worker = group.worker("worker")
        router_grpc, http_url = router_addresses(group.router([worker.ready]))
        assert http_url.startswith("https://")

        trusted = ssl.create_default_context(cafile=certs.ca)
        response = httpx.post(
            f"{http_url}/v1/completions", json=COMPLETION, verify=trusted, timeout=30
        )
        assert response.status_code == 200, response.text  # router -> worker over mTLS
        with pytest.raises(httpx.ConnectError):  # the system CAs do not know ours
            httpx.get(f"{http_url}/health", timeout=30)
        with pytest.raises(httpx.HTTPError):  # no plaintext on the TLS port
            httpx.get(http_url.replace("https://", "http://") + "/health", timeout=30)

        # The router's public gRPC port takes TLS clients without client certificates.
        with Client(router_grpc, tls_ca=certs.ca, timeout_s=60) as client:
            assert len(client.generate([3, 4], max_tokens=2, ignore_eos=True).token_ids) == 2

        ca = certs.ca.read_bytes()
        mutual = grpc.ssl_channel_credentials(
            ca, certs.client_key.read_bytes(), certs.client_cert.read_bytes()
        )
        rogue = grpc.ssl_channel_credentials(
            ca, certs.rogue_key.read_bytes(), certs.rogue_cert.read_bytes()
        )
        assert worker_call(worker.ready, mutual) is grpc.StatusCode.OK
        for refused in (None, grpc.ssl_channel_credentials(ca), rogue):
            assert worker_call(worker.ready, refused) is grpc.StatusCode.UNAVAILABLE


def listening(pid: int) -> set[str]:
    """Local host of every TCP socket the process listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(words)
                mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
                hosts.add(str(mapped or address))
    return hosts


def test_up_exposes_only_the_gateway_and_hands_secrets_down_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certs(tmp_path / "certs")
    for name, value in {**tls_env(certs), "EXEGPT_API_KEY": KEY}.items():
        monkeypatch.setenv(name, value)
    extra = ("--host", "0.0.0.0", "--pipeline-stages", "2", "--threads-per-device", "1")
    with launched(tmp_path, *extra, replicas=1) as up:
        children = {name: up.pid_of(name) for name in ("router", "worker-0", "stage-0-0-0")}
        assert all(children.values()), children
        exposed = listening(children["router"])
        assert exposed and exposed <= {"0.0.0.0", "::"}, exposed  # every interface
        for name in ("worker-0", "stage-0-0-0", "stage-0-1-0"):
            pid = up.pid_of(name)
            assert pid is not None and listening(pid) == {"127.0.0.1"}, name
            assert KEY not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
            assert f"EXEGPT_API_KEY={KEY}" in Path(f"/proc/{pid}/environ").read_text()

        url = up.http_url.replace("0.0.0.0", "127.0.0.1")
        trusted = ssl.create_default_context(cafile=certs.ca)
        anonymous = httpx.post(f"{url}/v1/completions", json=COMPLETION, verify=trusted)
        assert anonymous.status_code == 401
        response = httpx.post(  # gateway -> worker -> stages, each hop with key and mTLS
            f"{url}/v1/completions",
            json=COMPLETION,
            headers={"Authorization": f"Bearer {KEY}"},
            verify=trusted,
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
