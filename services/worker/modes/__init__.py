"""Schedule modes: how batches form on a replica (one file each, registered by name).

A mode answers one question for the step scheduler: how many waiting requests may join the
running batch now. The XRunner modes (rra, waa) plug in here beside the baselines.
"""

from __future__ import annotations

from typing import Protocol

from services.worker.config import BatchingMode
from services.worker.modes.continuous import ContinuousMode
from services.worker.modes.static import StaticMode


class ScheduleMode(Protocol):
    def admission_limit(self, num_running: int, max_batch_size: int) -> int:
        """How many waiting requests may be admitted now (0: none)."""
        ...


_MODES: dict[BatchingMode, type[ScheduleMode]] = {
    BatchingMode.CONTINUOUS: ContinuousMode,
    BatchingMode.STATIC: StaticMode,
}


def make_mode(mode: BatchingMode) -> ScheduleMode:
    return _MODES[mode]()
