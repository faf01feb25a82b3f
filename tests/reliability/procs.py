"""Real service processes for the reliability tests: started, watched and always cleaned up.

Every service runs as its own `python -m services.X` process on 127.0.0.1 with one torch
thread (the test machine is small and shared), publishing its address through a ready file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from exegpt.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.wait import wait_until  # noqa: F401 (the reliability tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ready: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)


@dataclass
class Services:
    """Processes started in one test; `close()` ends every one of them (SIGCONT first)."""

    directory: Path
    started: list[Service] = field(default_factory=list)
    # Extra environment of every process started (EXEGPT_API_KEY, EXEGPT_TLS_*, ...).
    env: dict[str, str] = field(default_factory=dict)

    def spawn(self, name: str, command: list[str]) -> tuple[Service, Path]:
        ready_file = self.directory / f"{name}.ready"
        ready_file.unlink(missing_ok=True)
        log_path = self.directory / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [*command, "--ready-file", str(ready_file)],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
            )
        service = Service(name, process, log_path)
        self.started.append(service)
        return service, ready_file

    def start(self, name: str, module: str, args: list[str]) -> Service:
        service, ready_file = self.spawn(name, [sys.executable, "-m", module, *args])
        service.ready = wait_ready(service, ready_file)
        return service

    def worker(self, name: str, port: int = 0, extra: tuple[str, ...] = ()) -> Service:
        return self.workers([name], [port], extra)[0]

    def workers(
        self, names: list[str], ports: list[int] | None = None, extra: tuple[str, ...] = ()
    ) -> list[Service]:
        """Start workers side by side (model loading overlaps), then wait for each."""
        spawned = []
        for name, port in zip(names, ports or [0] * len(names), strict=True):
            args = ["--port", str(port), "--torch-threads", "1", "--max-batch-size", "8"]
            command = [sys.executable, "-m", "services.worker", *args, *extra]
            spawned.append(self.spawn(name, command))
        for service, ready_file in spawned:
            service.ready = wait_ready(service, ready_file)
        return [service for service, _ in spawned]

    def router(self, replicas: list[str], extra: tuple[str, ...] = ()) -> Service:
        args = ["--replicas", ",".join(replicas), "--grpc-port", "0", "--http-port", "0"]
        return self.start("router", "services.router", [*args, *extra])

    def close(self) -> None:
        for service in self.started:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGCONT)
                service.process.kill()
            service.process.wait(timeout=10)


def wait_ready(service: Service, ready_file: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready_file.exists():
            return ready_file.read_text().strip()
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{service.name} not ready in {STARTUP_TIMEOUT_S}s:\n{service.log()}")


@contextmanager
def services(directory: Path, env: dict[str, str] | None = None) -> Iterator[Services]:
    group = Services(directory, env=dict(env or {}))
    try:
        yield group
    finally:
        group.close()


def router_addresses(router: Service) -> tuple[str, str]:
    """(gRPC address, HTTP URL) of a router from its ready file."""
    grpc_address, http_url = router.ready.split()
    return grpc_address, http_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generate_request(
    max_tokens: int, request_id: str = "", temperature: float = 1.0
) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=generate_pb2.TokenIds(ids=[3, 4, 5]),
        sampling=generate_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=temperature, ignore_eos=True
        ),
    )


def worker_stats(address: str) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        return stub.GetStats(worker_pb2.GetStatsRequest(), timeout=10)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@dataclass
class StreamOutcome:
    """What one streaming call got: tokens, the first-token moment and how it ended."""

    num_tokens: int = 0
    request_ids: set[str] = field(default_factory=set)
    code: grpc.StatusCode | None = None
    details: str = ""
    first_token: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    call: Any = None


def stream_in_background(
    address: str, request: generate_pb2.GenerateRequest, timeout_s: float, via_router: bool
) -> StreamOutcome:
    """Stream from a worker (Worker.Generate) or router (Router.GenerateStream) on a thread."""
    outcome = StreamOutcome()

    def consume() -> None:
        with grpc.insecure_channel(address) as channel:
            if via_router:
                method = router_pb2_grpc.RouterStub(channel).GenerateStream
            else:
                method = worker_pb2_grpc.WorkerStub(channel).Generate
            call = method(request, timeout=timeout_s)
            outcome.call = call
            try:
                for chunk in call:
                    outcome.num_tokens += len(chunk.token_ids)
                    outcome.request_ids.add(chunk.request_id)
                    outcome.first_token.set()
                outcome.code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                outcome.code, outcome.details = exc.code(), exc.details() or ""
            finally:
                outcome.done.set()

    threading.Thread(target=consume, daemon=True).start()
    return outcome
