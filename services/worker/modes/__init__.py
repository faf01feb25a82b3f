"""Schedule modes: how batches form on a replica (one file each, registered by kind).

A mode answers the step scheduler's questions at each step boundary: how many waiting
requests may join the running batch and which, and whether the batch may decode now.
The baselines (continuous, static) sit beside ExeGPT's planned schedules (rra, waa).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from exegpt.schedule import Schedule, ScheduleKind
from services.worker.config import EngineConfig
from services.worker.modes.base import FcfsMode, ModeView
from services.worker.modes.continuous import ContinuousMode
from services.worker.modes.rra import RraMode
from services.worker.modes.static import StaticMode
from services.worker.modes.waa import WaaMode
from services.worker.policies import BasePolicy, Load
from services.worker.requests import EngineRequest
from services.worker.waiting_queue import WaitingQueue

__all__ = ["ModeView", "ScheduleMode", "make_mode"]


class ScheduleMode(Protocol):
    num_micro_batches: int

    def admission_limit(self, view: ModeView) -> int: ...

    def choose(self, waiting: WaitingQueue, limit: int) -> Iterable[EngineRequest]: ...

    def victim(self, candidates: list[Load]) -> Load: ...

    def use_policy(self, policy: BasePolicy) -> None: ...

    def on_admitted(self, num_admitted: int, view: ModeView) -> None: ...

    def may_decode(self, view: ModeView) -> bool: ...

    def on_decoded(self, num_finished: int) -> None: ...


def _schedule(config: EngineConfig) -> Schedule:
    assert config.schedule is not None, "checked by EngineConfig"
    return config.schedule


def _baseline(mode: type[FcfsMode]) -> Callable[[EngineConfig], FcfsMode]:
    """A baseline's mode: with a planned schedule (pushed, or `--schedule`), its batch size
    caps the running batch (without one, the replica's --max-batch-size). Its micro-batch
    groups stay the replica's (one per stage): the stages in force, not the schedule's
    field, which static batching's schedules leave at 1."""

    def make(config: EngineConfig) -> FcfsMode:
        batch = None if config.schedule is None else config.schedule.decode_batch_size
        return mode(config.num_micro_batches, batch)

    return make


_MODES: dict[ScheduleKind, Callable[[EngineConfig], FcfsMode]] = {
    ScheduleKind.CONTINUOUS: _baseline(ContinuousMode),
    ScheduleKind.STATIC: _baseline(StaticMode),
    ScheduleKind.RRA: lambda c: RraMode(_schedule(c), c.mean_input_tokens, c.input_band),
    ScheduleKind.WAA_C: lambda c: WaaMode(_schedule(c)),
    ScheduleKind.WAA_M: lambda c: WaaMode(_schedule(c)),
}


def make_mode(config: EngineConfig, policy: BasePolicy | None = None) -> ScheduleMode:
    """The mode of `config`'s kind, taking its queue order and victims from `policy`."""
    mode = _MODES[config.batching](config)
    if policy is not None:
        mode.use_policy(policy)
    return mode
