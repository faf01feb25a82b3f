"""`exegpt up` supervises: dead services come back on their ports; a crash loop stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.reliability.procs import REPO_ROOT, pid_alive, wait_until, worker_stats

COMPLETION = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}


@dataclass
class Launcher:
    process: subprocess.Popen[str]
    http_url: str
    replicas: list[str]
    log_path: Path
    grpc_address: str = ""

    def pid_of(self, name: str) -> int | None:
        """The live child whose ready file is `name`.ready (worker-0, router, ...)."""
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if int(stat[1]) == self.process.pid and f"{name}.ready" in cmdline:
                return int(proc.name) if stat[0] != "Z" else None
        return None


@contextmanager
def launched(tmp_path: Path, *extra: str, replicas: int = 2) -> Iterator[Launcher]:
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--replicas", str(replicas),
        "--torch-threads", "1", "--http-port", "0", "--grpc-port", "0",
        "--log-dir", str(tmp_path), *extra,
    ]  # fmt: skip
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert "ready" in line, log_path.read_text()
        http_url = re.search(r"http=(\S+)", line).group(1)  # type: ignore[union-attr]
        addresses = re.search(r"replicas=(\S+)", line).group(1).split(",")  # type: ignore[union-attr]
        grpc_address = re.search(r"grpc=(\S+)", line).group(1)  # type: ignore[union-attr]
        yield Launcher(process, http_url, addresses, log_path, grpc_address)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def complete(http_url: str) -> int:
    response = httpx.post(f"{http_url}/v1/completions", json=COMPLETION, timeout=30)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["completion_tokens"])


def healthy_replicas(http_url: str) -> int:
    try:
        return int(httpx.get(f"{http_url}/health", timeout=5).json()["healthy_replicas"])
    except (httpx.HTTPError, ValueError):
        return -1


def test_killed_worker_and_router_come_back_on_their_ports(tmp_path: Path) -> None:
    with launched(tmp_path) as up:
        first = up.pid_of("worker-0")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(4):  # the other replica serves meanwhile (retried before a token)
            assert complete(up.http_url) == 3
        wait_until(lambda: healthy_replicas(up.http_url) == 2, 30, "worker-0 back in rotation")
        assert up.process.poll() is None, up.log_path.read_text()
        assert up.pid_of("worker-0") not in (None, first)
        for _ in range(4):
            assert complete(up.http_url) == 3
        # Round robin over two healthy replicas: the restarted worker, on its old port, served.
        assert worker_stats(up.replicas[0]).num_finished > 0

        router = up.pid_of("router")
        assert router is not None
        os.kill(router, signal.SIGKILL)
        wait_until(lambda: healthy_replicas(up.http_url) == 2, 30, "the router on its old port")
        assert complete(up.http_url) == 3
        assert "restarting it" in up.log_path.read_text()


def test_crash_loop_stops_the_deployment_and_says_why(tmp_path: Path) -> None:
    with launched(tmp_path, "--max-restarts", "1", replicas=1) as up:
        first = up.pid_of("worker-0")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: up.pid_of("worker-0") not in (None, first), 20, "a restart")
        assert up.process.poll() is None, up.log_path.read_text()
        wait_until(lambda: healthy_replicas(up.http_url) == 1, 30, "the restarted worker")
        second = up.pid_of("worker-0")
        assert second is not None and pid_alive(second)
        os.kill(second, signal.SIGKILL)
        assert up.process.wait(timeout=30) == 1
        log = up.log_path.read_text()
        assert "worker-0 exited 2 times" in log and "crash loop" in log, log
