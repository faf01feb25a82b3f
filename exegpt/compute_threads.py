"""Which threads of a serving process may run torch's parallel CPU work: one at a time.

torch's CPU builds run their parallel regions on OpenMP (libgomp). Each thread that opens a
parallel region gets a team of worker threads of its own, and the team lives as long as that
thread does. libgomp lets idle workers spin between regions only while all teams' threads
together fit the CPUs the process may use; past that they sleep, and every region pays a
futex wake-up. A worker that loaded its model on one thread and ran its engine on another had
two teams on 2 CPUs. Measured on the development VM (2 threads): an element-wise add of
[512, 512] took 80 µs instead of 17, a bf16 [32, 512]·[512, 2048] Linear 370 µs instead of
220, and a served t5-small decode-heavy run (task G) made 2.5 seq/s where the same engine on a
single computing thread made 4.5.

So a computing process keeps its main thread serial (`serial_main_thread`, one OpenMP thread,
so it never opens a team), loads its model on a thread that ends when the load does
(`in_passing_thread`: an ended thread's team goes with it), and gives the long-lived thread
that computes (the engine loop, a stage's loop) the configured count (`use_threads`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def serial_main_thread(num_threads: int | None) -> int:
    """Make the calling (main) thread run torch serially; returns the thread count the
    computing thread should use: `num_threads`, or torch's default for this process. Call it
    before the thread runs any tensor op."""
    count = num_threads or torch.get_num_threads()
    _settle(1)
    return count


def use_threads(num_threads: int | None) -> None:
    """Give the calling thread `num_threads` OpenMP threads (None: leave it as it is)."""
    if num_threads:
        _settle(num_threads)


def _settle(num_threads: int) -> None:
    """Set this thread's count now. torch applies a thread's count at its first parallel op,
    from the count the process set last, on any thread: a main thread set to 1 whose first
    op came after a loading thread set 2 ran with 2. A tiny op fixes it at once; at one
    thread it runs inline and opens no team."""
    torch.set_num_threads(num_threads)
    torch.ones(8, 8).triu_(1)


def run_in_passing_thread(fn: Callable[[], T], num_threads: int | None, name: str) -> T:
    """fn() on a fresh thread of `num_threads` that ends with it; returns or raises what fn
    does. Blocks the caller."""
    outcome: list = []

    def body() -> None:
        try:
            use_threads(num_threads)
            outcome.append((True, fn()))
        except BaseException as exc:  # re-raised in the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


async def in_passing_thread(fn: Callable[[], T], num_threads: int | None, name: str) -> T:
    """`run_in_passing_thread` without blocking the event loop."""
    return await asyncio.to_thread(run_in_passing_thread, fn, num_threads, name)
