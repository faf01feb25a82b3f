"""What a replica runs and how it does under it, for `Worker.GetSchedule` (and the gateway's
`GET /schedule`): the schedule's origin (flags, a plan file, or a version the scheduler
pushed), what its plan predicted, every switch the engine made, and what was measured since
the schedule started.

The engine takes a new schedule at its next step boundary, so a version handed to it is
*pending* until the engine's switch list grows; the measurements restart when it is handed
over (the steps in between are at most one per stage). Everything here runs on the server's
event loop: finishes are recorded by the Generate handler, offers by the schedule link.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from exegpt import latency
from exegpt.latency import Generation
from exegpt.plan_file import PlanFile
from exegpt.schedule import Schedule
from exegpt.schedule_proto import schedule_to_proto
from exegpt.v1 import worker_pb2

if TYPE_CHECKING:
    from services.worker.engine import Engine

MAX_FINISHES_KEPT = 8192  # for the p99-length latency; the count of finishes is exact


class ScheduleSource(StrEnum):
    FLAGS = "flags"  # --batching and --max-batch-size alone
    PLAN = "plan"  # --schedule PLAN.json
    SCHEDULER = "scheduler"  # pushed over WatchSchedule


@dataclass(frozen=True)
class PlannedPrediction:
    """What a plan predicted for its schedule (exegpt plan --json, or a ScheduleUpdate), for
    this replica: a plan of R data-parallel replicas predicts R times one replica's
    throughput, so each replica expects 1/R of it (and the same latency)."""

    throughput_seq_s: float
    throughput_tokens_s: float
    latency_s: float  # of a 99th-percentile-length output
    meets_bound: bool = True
    latency_bound_s: float | None = None  # None: no bound
    workload: str = ""

    @classmethod
    def from_plan(cls, plan: PlanFile) -> PlannedPrediction | None:
        predicted = plan.predicted
        try:
            whole = cls(
                throughput_seq_s=float(predicted["throughput_seq_s"]),
                throughput_tokens_s=float(predicted.get("throughput_tokens_s", 0.0)),
                latency_s=float(predicted["latency_s"]),
                meets_bound=plan.meets_bound,
                latency_bound_s=plan.latency_bound_s,
                workload=plan.workload,
            )
        except (KeyError, TypeError, ValueError):
            return None  # a plan without its prediction still runs
        return whole.per_replica(plan.num_replicas)

    def per_replica(self, num_replicas: int) -> PlannedPrediction:
        """One replica's share of this prediction for a plan of `num_replicas` data-parallel
        replicas: 1/R of its throughput, the same latency."""
        return dataclasses.replace(
            self,
            throughput_seq_s=self.throughput_seq_s / num_replicas,
            throughput_tokens_s=self.throughput_tokens_s / num_replicas,
        )

    def to_proto(self) -> worker_pb2.SchedulePrediction:
        return worker_pb2.SchedulePrediction(
            throughput_seq_s=self.throughput_seq_s,
            throughput_tokens_s=self.throughput_tokens_s,
            latency_s=self.latency_s,
            meets_bound=self.meets_bound,
            latency_bound_s=self.latency_bound_s or 0.0,
            workload=self.workload,
        )


@dataclass(frozen=True)
class ScheduleOrigin:
    """Where the schedule handed to the engine came from."""

    source: ScheduleSource
    version: int = 0  # the scheduler's version (SCHEDULER only)
    reason: str = ""  # why the scheduler published it (initial, length-drift, ...)
    prediction: PlannedPrediction | None = None
    schedule: Schedule | None = None
    published_unix_s: float = 0.0


@dataclass(frozen=True)
class Finish:
    at_s: float  # monotonic
    output_tokens: int
    latency_s: float  # generation latency: first admission to last token (exegpt/latency.py)


@dataclass(frozen=True)
class Measured:
    elapsed_s: float
    num_finished: int
    throughput_seq_s: float
    p99_length_latency_s: float  # 0 until a sequence finished
    p99_output_tokens: int


def p99_length_latency(finishes: list[Finish]) -> tuple[float, int]:
    """(the p99-length latency of these finishes, as exegpt/latency.py defines it, and the
    p99 output length); (0, 0) without finishes."""
    if not finishes:
        return 0.0, 0
    return latency.p99_length_latency([Generation(f.output_tokens, f.latency_s) for f in finishes])


class ScheduleBoard:
    def __init__(
        self,
        engine: Engine,
        origin: ScheduleOrigin,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._active = origin
        self._pending: ScheduleOrigin | None = None
        self._pending_after = 0  # the engine's switch count when `_pending` was handed over
        self._started_s = clock()
        self._finishes: deque[Finish] = deque(maxlen=MAX_FINISHES_KEPT)
        self._num_finished = 0
        self._finished_at_start = 0
        self.scheduler = ""  # the scheduler watched ("" without --scheduler)
        self.scheduler_connected = False

    @property
    def active(self) -> ScheduleOrigin:
        self._settle()
        return self._active

    @property
    def pending(self) -> ScheduleOrigin | None:
        self._settle()
        return self._pending

    @property
    def handed_over(self) -> ScheduleOrigin:
        """The newest schedule given to the engine, running or pending: what a resubscribing
        replica says it runs."""
        self._settle()
        return self._pending or self._active

    def offer(self, origin: ScheduleOrigin) -> None:
        """`origin`'s schedule was just handed to the engine (Engine.apply_schedule)."""
        self._settle()
        self._pending = origin
        self._pending_after = len(self._engine.switches)
        self._started_s = self._clock()
        self._finished_at_start = self._num_finished

    def record_finish(self, output_tokens: int, latency_s: float) -> None:
        self._num_finished += 1
        self._finishes.append(Finish(self._clock(), output_tokens, latency_s))

    def measured(self) -> Measured:
        now = self._clock()
        elapsed_s = max(0.0, now - self._started_s)
        num_finished = self._num_finished - self._finished_at_start
        since = [f for f in self._finishes if f.at_s >= self._started_s]
        latency_s, p99_tokens = p99_length_latency(since)
        return Measured(
            elapsed_s=elapsed_s,
            num_finished=num_finished,
            throughput_seq_s=num_finished / elapsed_s if elapsed_s > 0 else 0.0,
            p99_length_latency_s=latency_s,
            p99_output_tokens=p99_tokens,
        )

    def _settle(self) -> None:
        """The pending schedule is active once the engine made its switch."""
        if self._pending is not None and len(self._engine.switches) > self._pending_after:
            self._active, self._pending = self._pending, None

    def status(self) -> worker_pb2.ScheduleStatus:
        engine = self._engine
        active, pending = self.active, self.pending
        config = engine.config
        measured = self.measured()
        status = worker_pb2.ScheduleStatus(
            kind=str(config.batching),
            placement_json=engine.placement.to_json() if engine.placement else "",
            source=str(active.source),
            version=active.version,
            reason=active.reason,
            pending_version=pending.version if pending else 0,
            elapsed_s=measured.elapsed_s,
            num_finished=measured.num_finished,
            measured_throughput_seq_s=measured.throughput_seq_s,
            measured_p99_length_latency_s=measured.p99_length_latency_s,
            measured_p99_output_tokens=measured.p99_output_tokens,
            scheduler=self.scheduler,
            scheduler_connected=self.scheduler_connected,
        )
        if config.schedule is not None:
            status.schedule.CopyFrom(schedule_to_proto(config.schedule))
        if active.prediction is not None:
            status.prediction.CopyFrom(active.prediction.to_proto())
        for switch in list(engine.switches):
            status.switches.add(
                schedule=schedule_to_proto(switch.schedule),
                redeployed=switch.redeployed,
                duration_s=switch.duration_s,
            )
        return status


def initial_origin(schedule: Schedule | None, planned: PlannedPrediction | None) -> ScheduleOrigin:
    """The origin of what a worker starts with: a plan file's schedule, or its flags."""
    if schedule is None:
        return ScheduleOrigin(ScheduleSource.FLAGS)
    return ScheduleOrigin(ScheduleSource.PLAN, prediction=planned, schedule=schedule)
