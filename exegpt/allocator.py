"""Pin glibc malloc's treatment of large blocks, so timings do not depend on history.

PyTorch's CPU tensors come from malloc. By default glibc serves blocks above a threshold
(128 KiB at start) with fresh mmap()s, raises that threshold as such blocks are freed, and
hands the top of the heap back to the kernel whenever enough of it is free. Which of these
happen depends on everything the process allocated before, and a block that comes back
from the kernel is paid for again in page faults on first touch: the same decode-attention
step of the default model measured 16 ms or 43 ms per layer depending on the allocator's
state. Fixing both thresholds makes every block up to 32 MiB (glibc's ceiling) reuse heap
memory, and keeps up to 1 GiB of freed heap, so repeated steps cost the same every time.

The profiler and the workers both call `configure_allocator()` at start-up, so the profile
describes the processes that serve (elsewhere, MALLOC_MMAP_THRESHOLD_=33554432 and
MALLOC_TRIM_THRESHOLD_=1073741824 in the environment do the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc refuses more on 64-bit
TRIM_THRESHOLD_BYTES = 2**30


@functools.cache
def configure_allocator() -> str:
    """Apply the thresholds once per process; returns what was set ("" where not glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return ""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError) as exc:
        logger.warning("could not configure malloc (timings may vary run to run): %s", exc)
        return ""
    if not (mmap_ok and trim_ok):
        logger.warning("glibc refused the malloc thresholds; timings may vary run to run")
        return ""
    return f"glibc mmap_threshold={MMAP_THRESHOLD_BYTES} trim_threshold={TRIM_THRESHOLD_BYTES}"
