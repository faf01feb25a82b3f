"""Executors carry out the step scheduler's plans: `LocalExecutor` in this process,
`PipelineExecutor` over stage processes. The engine drives both through this interface."""

from __future__ import annotations

from typing import Protocol

from exegpt.placement import Placement
from services.worker.step_plan import StepPlan, StepResult


class Executor(Protocol):
    # Steps that may be in flight at once: 1 in process, one per stage in a pipeline.
    max_in_flight: int

    @property
    def num_in_flight(self) -> int: ...

    @property
    def ahead_counts(self) -> tuple[int, int]:
        """Decode steps sent with tensors built ahead, and decode steps built at submit
        ((0, 0) where nothing is built ahead)."""
        ...

    def submit(self, plan: StepPlan) -> None:
        """Start a step (never raises for a bad step: its result carries the error)."""
        ...

    def next_result(self, timeout_s: float) -> StepResult | None:
        """The next finished step, or None after `timeout_s` without one. The wait is also
        the executor's idle time: a pipeline builds its sent decode steps' successors in it
        (a grace first, then the build), within the same `timeout_s`."""
        ...

    def healthy(self) -> bool:
        """False while the executor cannot run steps (a stage is down)."""
        ...

    @property
    def placement(self) -> Placement | None:
        """Where the layers run (None: all in this process)."""
        ...

    def redeploy(self, placement: Placement) -> None:
        """Run `placement` from now on; raises ValueError if these devices cannot."""
        ...

    def close(self) -> None: ...
