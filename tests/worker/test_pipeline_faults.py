"""`exegpt up` with pipelined replicas, under load, when a stage process is killed: every
request completes or gets an explicit error quickly, the router uses the other replica, and
the replica comes back once the launcher has restarted its stage, and neither the killed
stage's shared-memory ring nor its upstream stage's ring to it stays behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exegpt.sdk import Client, ExegptError
from exegpt.shm_sweep import leftover_segments
from tests.reliability.test_supervision import Launcher, launched

NUM_STREAMS = 6
MAX_TOKENS = 400
ANSWER_BOUND_S = 10.0


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
def deployment(tmp_path: Path) -> Iterator[tuple[Launcher, Path]]:
    # Stage processes are the launcher's own children: looked up by parent, never by name
    # alone (another deployment on the machine may run a stage of the same name).
    with launched(tmp_path, "--pipeline-stages", "2", "--threads-per-device", "1",
                  "--max-batch-size", "8") as launcher:  # fmt: skip
        yield launcher, tmp_path


def test_a_killed_stage_answers_every_request_and_the_other_replica_serves(deployment) -> None:
    launcher, log_dir = deployment
    address = launcher.grpc_address
    streams = [Stream() for _ in range(NUM_STREAMS)]
    threads = [
        threading.Thread(target=s.run, args=(address, [5 + i, 6, 7]), daemon=True)
        for i, s in enumerate(streams)
    ]
    for thread in threads:
        thread.start()
    for stream in streams:
        assert stream.first_token.wait(60), stream.error
    stage_pid = launcher.pid_of("stage-0-1-0")
    assert stage_pid is not None
    assert leftover_segments(stage_pid)  # the stage streams its outputs through a ring
    upstream_pid = launcher.pid_of("stage-0-0-0")
    assert upstream_pid is not None
    upstream_rings = leftover_segments(upstream_pid)  # its ring to the stage about to die
    assert upstream_rings
    os.kill(stage_pid, signal.SIGKILL)
    killed_s = time.monotonic()
    for thread in threads:
        thread.join(ANSWER_BOUND_S + 30)
    for stream in streams:
        assert stream.done_s is not None
        assert stream.error is not None or stream.num_tokens == MAX_TOKENS
    # The killed replica's requests get their error within the bound; the others run on at
    # the surviving replica's own pace (400 tokens, slower than the bound on a loaded CI).
    failed = [s for s in streams if s.error is not None]
    assert failed and all("unavailable" in (s.error or "") for s in failed)
    assert all(s.done_s - killed_s < ANSWER_BOUND_S for s in failed)

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
    assert leftover_segments(stage_pid) == []  # its ring, which it could not unlink, is swept
    # The restarted stage has a new data address: the reload closed the upstream stage's
    # socket and ring to the old one.
    assert not any(ring.exists() for ring in upstream_rings)
