"""Ring segments' names, and the sweep of those whose sender died.

A segment is named `exegpt-shm-<pid>-<random>` after the process that created it. A sender
unlinks its ring on close, on garbage collection and at exit; a SIGKILLed one cannot, so its
ring would hold memory until reboot. Each new ring, and the launcher for a child it saw die,
first removes the segments whose creator is dead.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "exegpt-shm-"
# Only names the ring itself makes: no '/', '.', or anything a path could be built from.
SEGMENT_NAME = re.compile(rf"^{re.escape(SEGMENT_PREFIX)}([0-9]+)-[0-9a-f]{{16}}$")


def leftover_segments(pid: int, directory: Path = SHM_DIR) -> list[Path]:
    """Ring segments a process created that still exist (for tests and operators)."""
    return sorted(directory.glob(f"{SEGMENT_PREFIX}{pid}-*"))


def sweep_dead_segments(directory: Path = SHM_DIR, *, pid: int | None = None) -> list[Path]:
    """Unlink the ring segments whose creator (the pid in the name) is dead; returns them.

    A SIGKILLed sender never runs its finalizer, so its ring would hold memory until reboot.
    A live creator's segment is never touched (a reused pid keeps a dead ring longer: the safe
    side); receivers still mapping an unlinked segment read on until they unmap it.
    """
    removed = []
    for path in directory.glob(f"{SEGMENT_PREFIX}{'*' if pid is None else pid}-*"):
        match = SEGMENT_NAME.match(path.name)
        if match is None or not _is_dead(int(match.group(1))):
            continue
        try:
            path.unlink()
        except OSError:
            continue  # swept by another process meanwhile, or not ours to remove
        removed.append(path)
    if removed:
        logger.info("removed %d ring segment(s) of dead processes", len(removed))
    return removed


def _is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass  # another user's live process, or not a pid at all: not ours to judge
    return False
