"""`exegpt up` with pipelined replicas, under load, when a stage process is killed: every
request completes or gets an explicit error quickly, the router uses the other replica, and
the replica comes back once the launcher has restarted its stage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exegpt.sdk import Client, ExegptError

NUM_STREAMS = 6
MAX_TOKENS = 400
ANSWER_BOUND_S = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stream:
    num_tokens: int = 0
    error: str | None = None
    first_token: threading.Event = field(default_factory=threading.Event)
    done_s: float | None = None

    def run(self, address: str, prompt: list[int]) -> None:
        try:
            with Client(address, timeout_s=120) as client:
                for chunk in client.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True):
                    self.num_tokens += len(chunk.token_ids)
                    self.first_token.set()
        except ExegptError as exc:
            self.error = f"{exc.code}: {exc}"
        finally:
            self.done_s = time.monotonic()


@pytest.fixture()
def deployment(tmp_path: Path):
    grpc_port, http_port = _free_port(), _free_port()
    command = [
        sys.executable, "-m", "exegpt.cli", "up", "--replicas", "2", "--pipeline-stages", "2",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--max-batch-size", "8",
        "--log-dir", str(tmp_path), "--threads-per-device", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if b"exegpt ready" in line:
            break
        assert time.monotonic() < deadline, "deployment did not start"
    else:
        pytest.fail(f"exegpt up exited: {process.wait()}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
    try:
        yield f"127.0.0.1:{grpc_port}", tmp_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _stage_pid(name: str) -> int:
    found = subprocess.run(
        ["pgrep", "-f", f"{name}.ready"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def test_a_killed_stage_answers_every_request_and_the_other_replica_serves(deployment) -> None:
    address, log_dir = deployment
    streams = [Stream() for _ in range(NUM_STREAMS)]
    threads = [
        threading.Thread(target=s.run, args=(address, [5 + i, 6, 7]), daemon=True)
        for i, s in enumerate(streams)
    ]
    for thread in threads:
        thread.start()
    for stream in streams:
        assert stream.first_token.wait(60), stream.error
    os.kill(_stage_pid("stage-0-1-0"), signal.SIGKILL)
    killed_s = time.monotonic()
    for thread in threads:
        thread.join(ANSWER_BOUND_S + 30)
    for stream in streams:
        assert stream.done_s is not None and stream.done_s - killed_s < ANSWER_BOUND_S
        assert stream.error is not None or stream.num_tokens == MAX_TOKENS
    failed = [s for s in streams if s.error is not None]
    assert failed and all("unavailable" in (s.error or "") for s in failed)

    # Right away, new requests go to the surviving replica.
    with Client(address, timeout_s=60) as client:
        for i in range(4):
            done = client.generate([9, i + 3], max_tokens=8, ignore_eos=True)
            assert len(done.token_ids) == 8

    # The launcher restarts the stage; the replica reloads it and serves again.
    worker_log = log_dir / "worker-0.log"
    deadline = time.monotonic() + 60
    while "serving again" not in worker_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, worker_log.read_text()[-3000:]
        time.sleep(0.2)
