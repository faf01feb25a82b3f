"""`exegpt up` as a user runs it: separate processes, a ready line, clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from exegpt.sdk import Client


def _children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def test_up_serves_two_replicas_and_stops_cleanly(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--replicas", "2",
        "--http-port", "0", "--grpc-port", "0", "--log-dir", str(tmp_path),
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = launcher.stdout.readline()
        assert "ready" in line, line
        http_url = re.search(r"http=(\S+)", line).group(1)
        grpc_address = re.search(r"grpc=(\S+)", line).group(1)
        children = _children_of(launcher.pid)
        assert len(children) == 3  # two workers and the router
        body = httpx.post(
            f"{http_url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True},
            timeout=60,
        ).json()
        assert body["usage"]["completion_tokens"] == 3
        with Client(grpc_address) as client:
            assert client.generate([3, 4], max_tokens=2).completion_tokens == 2
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children), "orphaned service processes"
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    assert _port_is_free(host, int(port))


def test_up_reports_a_bad_model_and_exits_nonzero(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exegpt.commands.cli", "up", "--model", str(tmp_path / "missing"),
         "--http-port", "0", "--grpc-port", "0", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "failed to start" in result.stderr
