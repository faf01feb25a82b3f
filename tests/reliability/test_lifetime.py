"""How long services live: one started by hand outlives the shell that started it; the
children of `exegpt up` stop when it dies, even by SIGKILL (no orphans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.reliability.procs import REPO_ROOT, pid_alive, wait_until, worker_stats
from tests.reliability.test_supervision import launched


def test_a_worker_started_from_a_shell_outlives_the_shell(tmp_path: Path) -> None:
    ready = tmp_path / "worker.ready"
    pid_file = tmp_path / "worker.pid"
    command = (
        f"{sys.executable} -m services.worker --port 0 --torch-threads 1 "
        f"--ready-file {ready} > {tmp_path / 'worker.log'} 2>&1 & echo $! > {pid_file}"
    )
    subprocess.run(["sh", "-c", command], cwd=REPO_ROOT, check=True, timeout=30)
    pid = int(pid_file.read_text())
    try:
        wait_until(ready.exists, 60, "the worker did not start")
        time.sleep(3)  # the shell is long gone; a watcher of the parent would have quit
        assert pid_alive(pid)
        assert worker_stats(ready.read_text().strip()).num_waiting == 0  # and it answers
    finally:
        os.kill(pid, signal.SIGTERM)


def test_the_children_of_exegpt_up_stop_when_it_is_killed(tmp_path: Path) -> None:
    with launched(tmp_path, replicas=1) as launcher:
        children = [launcher.pid_of("worker-0"), launcher.pid_of("router")]
        assert all(children), children
        launcher.process.send_signal(signal.SIGKILL)
        launcher.process.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in children if pid), 15, "orphans remain")


def _alive(pid: int) -> bool:
    try:
        return pid_alive(pid)
    except OSError:  # reaped between the two looks
        return False
