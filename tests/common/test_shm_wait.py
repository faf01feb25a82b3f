"""A sender waiting for a free slot is woken by the release (exegpt/shm_wait.py, ShmRing.reserve).

Real shared memory and a real second process: a futex sleeps until its word is woken or
changed and says whether it timed out, and a full ring's `reserve` returns the slot a
receiver releases during the wait, woken by that release rather than by its periodic look.
"""

from __future__ import annotations

import mmap
import platform
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from exegpt import shm_ring, shm_wait
from exegpt.shm_ring import ShmReader, ShmRing
from exegpt.shm_wait import futex_wait, futex_wake, has_futex
from tests.common.test_shm_ring import ROOT


def test_this_machine_waits_on_a_futex() -> None:
    assert sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
    assert has_futex()


@pytest.fixture()
def shared_word() -> tuple[np.ndarray, int]:
    """A u32 in a shared mapping (unmapped once garbage collected), and its address."""
    word = np.frombuffer(mmap.mmap(-1, 4096), dtype=np.uint32, count=1)
    return word, word.ctypes.data


def test_a_futex_wait_times_out_while_its_word_stays(shared_word: tuple[np.ndarray, int]) -> None:
    word, address = shared_word
    start_s = time.monotonic()
    assert futex_wait(address, int(word[0]), 0.05) is False
    assert time.monotonic() - start_s >= 0.04


def test_a_futex_wait_returns_at_once_when_its_word_already_changed(
    shared_word: tuple[np.ndarray, int],
) -> None:
    word, address = shared_word
    word[0] = 7
    assert futex_wait(address, 6, 30.0) is True


def test_a_futex_wait_is_woken_by_a_wake(shared_word: tuple[np.ndarray, int]) -> None:
    word, address = shared_word
    results: list[bool] = []
    waiter = threading.Thread(
        target=lambda: results.append(futex_wait(address, 0, 60.0)), daemon=True
    )
    waiter.start()
    while futex_wake(address) == 0:  # until the waiter is asleep and this wakes it
        assert waiter.is_alive()
        time.sleep(0.01)
    waiter.join(30)
    assert results == [True]


@pytest.fixture()
def slow_periodic_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting sender looks at its slots on its own only once a minute: a reserve that
    returns sooner was woken by the release."""
    monkeypatch.setattr(shm_ring, "_WAIT_SLICE_S", 60.0)


def reserve_in_thread(ring: ShmRing) -> tuple[threading.Thread, list[int | None]]:
    results: list[int | None] = []
    thread = threading.Thread(
        target=lambda: results.append(ring.reserve(64, wait_s=120)), daemon=True
    )
    thread.start()
    return thread, results


def assert_a_waiting_reserve_gets_the_slot_released_in_this_process() -> None:
    ring = ShmRing(slot_bytes=4096, num_slots=1)
    reader = ShmReader(max_payload_bytes=4096)
    try:
        ref = ring.publish(0, 64)
        reader.check(ref)
        thread, results = reserve_in_thread(ring)
        thread.join(0.3)
        assert thread.is_alive()  # the only slot is unread: the sender waits
        reader.release(ref)
        thread.join(30)
        assert results == [0]
    finally:
        reader.close()
        ring.close()


def test_a_release_in_this_process_wakes_a_waiting_reserve(slow_periodic_look: None) -> None:
    assert_a_waiting_reserve_gets_the_slot_released_in_this_process()


# Leases the slot named on its command line, says so, and drops it when stdin has a line.
RECEIVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from exegpt.shm_ring import ShmReader, SlotRef

    reader = ShmReader(max_payload_bytes=4096)
    ref = SlotRef(sys.argv[1], *map(int, sys.argv[2:]))
    reader.check(ref)
    view = reader.lease(ref)
    print("leased", flush=True)
    sys.stdin.readline()
    del view  # the lease ends: the slot goes back to the sender
    print("released", flush=True)
    """
)


def test_a_receiver_process_releasing_a_slot_wakes_the_waiting_sender(
    slow_periodic_look: None,
) -> None:
    ring = ShmRing(slot_bytes=4096, num_slots=1)
    ref = ring.publish(0, 64)
    command = [sys.executable, "-c", RECEIVER_SCRIPT, ref.segment, "0", str(ref.ticket), "64"]
    child = subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "leased"
        thread, results = reserve_in_thread(ring)
        thread.join(0.3)
        assert thread.is_alive()  # leased by the other process: the sender waits
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        thread.join(30)
        assert results == [0]
    finally:
        child.kill()
        child.wait()
        ring.close()


def test_a_full_ring_waits_its_whole_bound_then_gives_up() -> None:
    ring = ShmRing(slot_bytes=4096, num_slots=1)
    try:
        ring.publish(0, 64)  # never read: never released
        start_s = time.monotonic()
        assert ring.reserve(64, wait_s=0.2) is None
        assert time.monotonic() - start_s >= 0.2
        assert ring.reserve(64) is None  # and no wait at all without a bound
    finally:
        ring.close()


def test_a_wait_leaves_the_ring_flagged_as_not_waiting(tmp_path: Path) -> None:
    # A receiver wakes the sender only while it is flagged as waiting: after a wait, by
    # timeout or by a release, its releases make no more wake-up calls.
    ring = ShmRing(slot_bytes=4096, num_slots=1, directory=tmp_path)
    try:
        ring.publish(0, 64)
        ring.reserve(64, wait_s=0.01)
        words = np.frombuffer(ring.path.read_bytes()[:64], dtype=np.uint64)
        assert words[shm_ring._WAITING_WORD] == 0
    finally:
        ring.close()


def test_a_refused_futex_wait_reports_no_wake(shared_word: tuple[np.ndarray, int]) -> None:
    # A misaligned word is refused by the kernel (EINVAL): that is no wake-up, so a waiter
    # does not look again at once (a busy loop for its whole wait), it polls.
    _, address = shared_word
    assert futex_wait(address + 1, 0, 0.01) is False


def test_without_a_futex_a_waiting_reserve_still_gets_a_released_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shm_wait, "_libc", None)  # polling, as on a machine without futexes
    assert not has_futex()
    assert_a_waiting_reserve_gets_the_slot_released_in_this_process()
