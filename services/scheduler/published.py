"""What the scheduler core publishes and answers (plain dataclasses, shared by the core in
service.py and the gRPC conversions in convert.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from exegpt.placement import Placement
from services.scheduler.drift import DriftVerdict
from services.scheduler.problem import PlanProblem, PlanResult, Prediction


class ReplanReason(StrEnum):
    INITIAL = "initial"
    LENGTH_DRIFT = "length-drift"
    STAGE_TIME_DRIFT = "stage-time-drift"
    REQUESTED = "requested"


@dataclass(frozen=True)
class PublishedSchedule:
    version: int
    reason: ReplanReason
    prediction: Prediction
    meets_bound: bool
    problem: PlanProblem
    verdict: DriftVerdict | None
    detail: str
    published_unix_s: float
    # Where the schedule puts each layer, as simulated (None: it could not be laid out).
    placement: Placement | None = None


@dataclass(frozen=True)
class PlanOutcome:
    result: PlanResult
    workload_name: str
    version: int  # the published version when activated, else 0


@dataclass(frozen=True)
class ReportAck:
    num_input_lengths: int
    num_output_lengths: int
    num_stage_times: int
    current_version: int
