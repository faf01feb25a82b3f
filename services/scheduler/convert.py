"""Protobuf <-> dataclass conversion for the scheduler's gRPC surface (no server code here)."""

from __future__ import annotations

import math

from exegpt.schedule_proto import schedule_from_proto, schedule_to_proto
from exegpt.v1 import scheduler_pb2
from services.scheduler.drift import DriftVerdict, LengthDrift
from services.scheduler.observations import (
    StageKind,
    StageTimeObservation,
    WorkloadObservations,
)
from services.scheduler.problem import Prediction
from services.scheduler.queries import PlanQuery, invalid
from services.scheduler.service import PlanOutcome, PublishedSchedule, ReplanReason

__all__ = [
    "observations_from_proto",
    "outcome_to_proto",
    "prediction_to_proto",
    "query_from_proto",
    "schedule_from_proto",
    "schedule_to_proto",
    "update_to_proto",
    "verdict_to_proto",
]

_REASONS = {
    ReplanReason.INITIAL: scheduler_pb2.REPLAN_REASON_INITIAL,
    ReplanReason.LENGTH_DRIFT: scheduler_pb2.REPLAN_REASON_LENGTH_DRIFT,
    ReplanReason.STAGE_TIME_DRIFT: scheduler_pb2.REPLAN_REASON_STAGE_TIME_DRIFT,
    ReplanReason.REQUESTED: scheduler_pb2.REPLAN_REASON_REQUESTED,
}
_STAGES = {
    scheduler_pb2.STAGE_KIND_ENCODE: StageKind.ENCODE,
    scheduler_pb2.STAGE_KIND_DECODE: StageKind.DECODE,
    scheduler_pb2.STAGE_KIND_TRANSFER: StageKind.TRANSFER,
    scheduler_pb2.STAGE_KIND_OVERHEAD: StageKind.OVERHEAD,
}


def query_from_proto(request: scheduler_pb2.PlanRequest) -> PlanQuery:
    return PlanQuery(
        profile=request.profile,
        workload=request.workload,
        latency_bound_s=(request.latency_bound_s if request.HasField("latency_bound_s") else None),
        no_latency_bound=request.no_latency_bound,
        num_devices=request.num_devices if request.HasField("num_devices") else None,
        device_memory_bytes=(
            request.device_memory_bytes if request.HasField("device_memory_bytes") else None
        ),
        kinds=tuple(request.kinds),
        tp_degrees=tuple(request.tp_degrees),
        exhaustive=request.exhaustive,
        activate=request.activate,
    )


def prediction_to_proto(prediction: Prediction) -> scheduler_pb2.Prediction:
    return scheduler_pb2.Prediction(
        schedule=schedule_to_proto(prediction.schedule),
        feasible=prediction.feasible,
        throughput_seq_s=prediction.throughput_seq_s,
        throughput_tokens_s=prediction.throughput_tokens_s,
        latency_s=prediction.latency_s,
        memory_bytes_per_device=prediction.memory_bytes_per_device,
        utilisation_per_device=prediction.utilisation_per_device,
        reason=prediction.reason,
    )


def outcome_to_proto(outcome: PlanOutcome) -> scheduler_pb2.PlanResponse:
    result = outcome.result
    response = scheduler_pb2.PlanResponse(
        meets_bound=result.meets_bound,
        num_evaluations=result.search.num_evaluations,
        search_wall_s=result.search.wall_s,
        workload=outcome.workload_name,
        version=outcome.version,
    )
    if result.chosen is not None:
        response.chosen.CopyFrom(prediction_to_proto(result.chosen))
    if result.lowest_latency is not None:
        response.lowest_latency.CopyFrom(prediction_to_proto(result.lowest_latency))
    for kind, prediction in result.best_by_kind.items():
        response.best_by_kind[kind].CopyFrom(prediction_to_proto(prediction))
    return response


def _length_drift_to_proto(drift: LengthDrift | None) -> scheduler_pb2.LengthDrift | None:
    if drift is None:
        return None
    return scheduler_pb2.LengthDrift(
        num_observations=drift.num_observations,
        ks_distance=drift.ks_distance,
        ks_noise_floor=drift.ks_noise_floor,
        observed_mean_tokens=drift.observed_mean_tokens,
        planned_mean_tokens=drift.planned_mean_tokens,
        relative_mean_shift=drift.relative_mean_shift,
        drifted=drift.drifted,
    )


def verdict_to_proto(verdict: DriftVerdict) -> scheduler_pb2.DriftStatistics:
    ratios, counts = verdict.stage_time_ratios, verdict.stage_time_counts
    return scheduler_pb2.DriftStatistics(
        input=_length_drift_to_proto(verdict.input),
        output=_length_drift_to_proto(verdict.output),
        encode_time_ratio=ratios.get(StageKind.ENCODE, 0.0),
        decode_time_ratio=ratios.get(StageKind.DECODE, 0.0),
        num_encode_observations=counts.get(StageKind.ENCODE, 0),
        num_decode_observations=counts.get(StageKind.DECODE, 0),
    )


def update_to_proto(published: PublishedSchedule) -> scheduler_pb2.ScheduleUpdate:
    problem = published.problem
    workload = problem.workload
    bound_s = problem.latency_bound_s
    update = scheduler_pb2.ScheduleUpdate(
        version=published.version,
        reason=_REASONS[published.reason],
        schedule=schedule_to_proto(published.prediction.schedule),
        prediction=prediction_to_proto(published.prediction),
        meets_bound=published.meets_bound,
        latency_bound_s=0.0 if math.isinf(bound_s) else bound_s,
        workload=workload.name,
        mean_input_tokens=workload.mean_input_tokens,
        mean_output_tokens=workload.mean_output_tokens,
        p99_output_tokens=workload.output_p99_tokens,
        detail=published.detail,
        published_unix_s=published.published_unix_s,
        placement_json=published.placement.to_json() if published.placement else "",
    )
    if published.verdict is not None:
        update.drift.CopyFrom(verdict_to_proto(published.verdict))
    return update


def _stage_time_from_proto(message: scheduler_pb2.StageTimeObservation) -> StageTimeObservation:
    if message.stage not in _STAGES:
        raise invalid(
            "stage time: stage must be STAGE_KIND_ENCODE, STAGE_KIND_DECODE, "
            "STAGE_KIND_TRANSFER or STAGE_KIND_OVERHEAD"
        )
    try:
        return StageTimeObservation(
            stage=_STAGES[message.stage],
            batch_size=message.batch_size,
            num_tokens=message.num_tokens,
            num_layers=message.num_layers,
            measured_s=message.measured_s,
            tp_degree=message.tp_degree or 1,
            num_cross_tokens=message.num_cross_tokens,
            num_first_step_layers=message.num_first_step_layers,
        )
    except ValueError as exc:
        raise invalid(str(exc)) from exc


def observations_from_proto(
    report: scheduler_pb2.WorkloadReport, *, max_items: int
) -> WorkloadObservations:
    num_items = len(report.input_tokens) + len(report.output_tokens) + len(report.stage_times)
    if num_items > max_items:  # checked before converting anything
        raise invalid(f"report has {num_items} observations; the limit is {max_items} per report")
    return WorkloadObservations(
        replica_id=report.replica_id,
        input_tokens=tuple(report.input_tokens),
        output_tokens=tuple(report.output_tokens),
        stage_times=tuple(_stage_time_from_proto(m) for m in report.stage_times),
    )
