"""Waiting on a word of shared memory: a Linux futex, or short sleeps where there is none.

A sender whose ring is full waits for a receiver to release a slot. Polling with sleeps woke
late: on a loaded Linux machine a 20 us sleep lasts 60-100 us, and with the backoff to 200 us
a waiting sender overslept a release by 0.2-0.3 ms, long enough for its receiver to drain
the ring and sit idle. A futex sleeps in the kernel on a 32-bit word of the shared segment
and is woken by the receiver's release, at once. The futex is the shared kind (not
FUTEX_PRIVATE): the word lies in a file both processes map, so the kernel keys the wait on
the file's page, not on one process's address. Where there is no futex (not Linux, or an
architecture without a known syscall number), `futex_wait` sleeps briefly and reports a
timeout, and waiters fall back on polling.
"""

from __future__ import annotations

import ctypes
import errno
import math
import platform
import struct
import sys
import time

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_WAKE_ALL = 2**31 - 1
_FALLBACK_PAUSE_S = 50e-6  # the poll interval where there is no futex

# A 64-bit little-endian Linux process only: the word's low half, the syscall number and a
# timespec of two C longs are what this module assumes.
_USABLE = (
    sys.platform == "linux"
    and _SYS_FUTEX is not None
    and struct.calcsize("P") == 8
    and sys.byteorder == "little"
)
_libc = ctypes.CDLL(None, use_errno=True) if _USABLE else None
if _libc is not None:
    _libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def has_futex() -> bool:
    """Whether waits sleep on a futex here (True on Linux x86-64 and aarch64)."""
    return _libc is not None


def futex_wait(address: int, expected: int, timeout_s: float) -> bool:
    """Sleep while the u32 at `address` equals `expected`, for at most `timeout_s`.

    True when woken or the word already differed (look again); False on a timeout. The
    GIL is released while asleep (ctypes calls into libc without it). `address` must be a
    4-byte aligned word of a shared mapping that stays mapped during the call.
    """
    timeout_s = max(timeout_s, 0.0) if math.isfinite(timeout_s) else 0.0
    if _libc is None:
        time.sleep(min(timeout_s, _FALLBACK_PAUSE_S))
        return False
    whole_s = int(timeout_s)
    spec = _Timespec(whole_s, int((timeout_s - whole_s) * 1e9))
    result = _libc.syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(address),
        _FUTEX_WAIT,
        ctypes.c_uint32(expected),
        ctypes.byref(spec),
        None,
        0,
    )
    if result == 0 or ctypes.get_errno() in (errno.EAGAIN, errno.EINTR):
        return True  # woken, the word already differed, or a signal: look again
    if ctypes.get_errno() != errno.ETIMEDOUT:  # refused (EINVAL, EFAULT, a seccomp filter)
        time.sleep(min(timeout_s, _FALLBACK_PAUSE_S))  # never a busy loop: poll instead
    return False


def futex_wake(address: int) -> int:
    """Wake every thread waiting on the u32 at `address`; returns how many were woken."""
    if _libc is None:
        return 0
    woken = _libc.syscall(
        ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), _FUTEX_WAKE, _WAKE_ALL, None, None, 0
    )
    return max(woken, 0)
