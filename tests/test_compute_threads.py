"""One computing thread per process (exegpt/compute_threads.py), checked by the threads that
OpenMP teams leave behind: each subprocess counts its own OS threads."""

import subprocess
import sys

import pytest

from exegpt.compute_threads import run_in_passing_thread

COUNT = (
    "import os, time\n"
    "def threads():\n"
    "    return len(os.listdir('/proc/self/task'))\n"
    "def threads_settled_at(want):\n"  # an ended thread's OS thread and team leave after join
    "    deadline = time.monotonic() + 10\n"
    "    while threads() != want and time.monotonic() < deadline:\n"
    "        time.sleep(0.01)\n"
    "    return threads()\n"
)


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", COUNT + code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_serving_processes_opens_no_openmp_team() -> None:
    # A tensor op at import (a module-level mask did this) gives the importing thread a team
    # whose worker thread outlives it; the engine's team then shares the CPUs with it.
    out = run_python(
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "before = threads()\n"
        "import services.worker.__main__, services.worker.stage.__main__\n"
        "import services.worker.server, services.worker.stage.runtime\n"
        "after = threads()\n"
        "torch.ones(256, 256).triu_(1)\n"  # the probe: a team does add a thread
        "print(before, after, threads())\n"
    )
    before, after, probed = map(int, out.split())
    assert after == before
    assert probed > before


def test_a_passing_thread_takes_its_team_along_and_the_main_thread_stays_serial() -> None:
    out = run_python(
        "import torch\n"
        "from exegpt.compute_threads import run_in_passing_thread, serial_main_thread\n"
        "count = serial_main_thread(2)\n"
        "before = threads()\n"
        "work = lambda: (torch.get_num_threads(), int(torch.ones(256, 256).triu(1).sum()))\n"
        "inside = run_in_passing_thread(work, count, 'load')\n"
        "torch.ones(256, 256).triu_(1)\n"  # main's first op after the loader set 2
        "print(count, inside[0], inside[1], torch.get_num_threads(), before,"
        " threads_settled_at(before))\n"
    )
    count, inside, total, main_threads, before, after = map(int, out.split())
    assert (count, inside, total) == (2, 2, 256 * 255 // 2)
    assert main_threads == 1
    assert after == before


def test_a_passing_thread_returns_and_raises_what_its_function_does() -> None:
    assert run_in_passing_thread(lambda: 41 + 1, None, "t") == 42

    def broken() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        run_in_passing_thread(broken, None, "t")  # None: the process's count stays as it is

    with pytest.raises(RuntimeError, match="positive"):  # the real error, not a lost one
        run_in_passing_thread(lambda: 0, -1, "t")
