"""What a replica tells the scheduler (ReportWorkload), built from the engine's observations.

Lengths go as they are. Each step's per-stage compute times become StageTimeObservations:
the stages a step passed, in order (`Placement` routes), each with its own layer count and TP
degree. A prefill is STAGE_KIND_ENCODE on the stages that encode it: T5's encoder stages
(its decoder stages' part of a prefill, the cross-KV write and first token, is not an encode
in the cost model and is not reported), a decoder-only model's prefill stages (the decode
stages storing handed-off KV are not reported). A decode step is STAGE_KIND_DECODE on each
decoder stage. In process, the one measured time covers the whole model: the encoder's (T5,
with its decoder layers' first step: `num_first_step_layers`) or the decoder's layers. Each
measured hand-off of activations (handoff.py) is a STAGE_KIND_TRANSFER of its tokens, and
each in-process decode step's host time beyond its forward (engine_clock.py) a
STAGE_KIND_OVERHEAD of its rows. The scheduler refuses a whole
report for one invalid item, so items it would refuse are dropped here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from exegpt.models.config import ModelConfig
from exegpt.placement import Placement
from exegpt.v1 import scheduler_pb2
from services.worker.observations import MAX_KEPT, Observations, StepTime

ENCODE = scheduler_pb2.STAGE_KIND_ENCODE
DECODE = scheduler_pb2.STAGE_KIND_DECODE
TRANSFER = scheduler_pb2.STAGE_KIND_TRANSFER
OVERHEAD = scheduler_pb2.STAGE_KIND_OVERHEAD
MAX_LENGTH_TOKENS = 1 << 17  # the scheduler's default limit on a reported length


@dataclass(frozen=True)
class _RouteStage:
    kind: int  # ENCODE, DECODE, or 0: passed but not reported
    num_layers: int
    tp_degree: int
    num_first_step_layers: int = 0  # decoder layers whose first step the time also holds


def _route(step: StepTime, placement: Placement, model: ModelConfig) -> list[_RouteStage]:
    """The stages a step passed, in the order its stage times come."""
    stages = placement.stages
    if step.is_decode:
        return [
            _RouteStage(DECODE, len(stages[i].decoder_layers), stages[i].tp_degree)
            for i in placement.decoder_route()
        ]
    if model.is_encoder_decoder:
        encode = [
            _RouteStage(ENCODE, len(stages[i].encoder_layers), stages[i].tp_degree)
            for i in placement.encoder_route()
        ]
        return encode + [_RouteStage(0, 0, 1) for _ in placement.prefill_route()]
    route = [
        _RouteStage(ENCODE, len(stages[i].decoder_layers), stages[i].tp_degree)
        for i in placement.prefill_route()
    ]
    if placement.splits_prefill:  # the decode stages store the handed-off KV
        route += [_RouteStage(0, 0, 1) for _ in placement.decoder_route()]
    return route


def _whole_model(step: StepTime, model: ModelConfig) -> list[_RouteStage]:
    if step.is_decode:
        return [_RouteStage(DECODE, model.num_decoder_layers, 1)]
    if model.is_encoder_decoder:  # the forward also ran the decoder's first step
        return [_RouteStage(ENCODE, model.num_encoder_layers, 1, model.num_decoder_layers)]
    return [_RouteStage(ENCODE, model.num_decoder_layers, 1)]


def stage_times(
    step: StepTime, placement: Placement | None, model: ModelConfig
) -> list[scheduler_pb2.StageTimeObservation]:
    """One observation per reported stage of `step` (none when its times do not match the
    placement's route, e.g. a step that ran before a redeploy)."""
    route = _whole_model(step, model) if placement is None else _route(step, placement, model)
    if len(route) != len(step.stage_s):
        return []
    if step.batch_size < 1 or step.num_tokens < step.batch_size:
        return []
    observations = []
    for stage, measured_s in zip(route, step.stage_s, strict=True):
        if not stage.kind or stage.num_layers < 1:
            continue
        if not _positive(measured_s):
            continue
        observations.append(
            scheduler_pb2.StageTimeObservation(
                stage=stage.kind,
                batch_size=step.batch_size,
                num_tokens=step.num_tokens,
                num_cross_tokens=step.num_cross_tokens if stage.kind == DECODE else 0,
                num_layers=stage.num_layers,
                tp_degree=stage.tp_degree,
                measured_s=measured_s,
                num_first_step_layers=stage.num_first_step_layers,
            )
        )
    return observations


def _positive(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds > 0


def transfers_and_overheads(
    observations: Observations,
) -> list[scheduler_pb2.StageTimeObservation]:
    """The measured hand-offs (TRANSFER) and decode steps' host times (OVERHEAD)."""
    items = [
        _observation(TRANSFER, h.batch_size, h.num_tokens, h.measured_s)
        for h in observations.handoffs
        if 1 <= h.batch_size <= h.num_tokens and _positive(h.measured_s)
    ]
    items += [
        _observation(OVERHEAD, t.batch_size, t.batch_size, t.measured_s)
        for t in observations.host_times
        if _positive(t.measured_s)
    ]
    return items


def _observation(
    stage: int, batch_size: int, num_tokens: int, measured_s: float
) -> scheduler_pb2.StageTimeObservation:
    return scheduler_pb2.StageTimeObservation(
        stage=stage,
        batch_size=batch_size,
        num_tokens=num_tokens,
        tp_degree=1,
        measured_s=measured_s,
    )


def _lengths(values: Sequence[int]) -> list[int]:
    return [v for v in values if 1 <= v <= MAX_LENGTH_TOKENS]


def build_reports(
    observations: Observations,
    placement: Placement | None,
    model: ModelConfig,
    *,
    replica_id: str,
    max_items: int,
    with_stage_times: bool = True,
) -> list[scheduler_pb2.WorkloadReport]:
    """The observations as reports of at most `max_items` items each; one empty report when
    there is nothing (it still tells the replica the scheduler's current version)."""
    inputs = _lengths(observations.input_tokens)
    outputs = _lengths(observations.output_tokens)
    times: list[scheduler_pb2.StageTimeObservation] = []
    if with_stage_times:
        for step in observations.step_times:
            times += stage_times(step, placement, model)
        times += transfers_and_overheads(observations)
    reports = []
    pending: list[list] = [inputs, outputs, times]
    while any(pending):
        report = scheduler_pb2.WorkloadReport(replica_id=replica_id)
        room = max_items
        for index, target in enumerate(
            (report.input_tokens, report.output_tokens, report.stage_times)
        ):
            taken, pending[index] = pending[index][:room], pending[index][room:]
            target.extend(taken)
            room -= len(taken)
        reports.append(report)
    return reports or [scheduler_pb2.WorkloadReport(replica_id=replica_id)]


def merge(backlog: Observations, more: Observations) -> Observations:
    """`backlog` (unsent: the scheduler was down) followed by `more`, each list capped at the
    newest MAX_KEPT items."""
    return Observations(
        input_tokens=(backlog.input_tokens + more.input_tokens)[-MAX_KEPT:],
        output_tokens=(backlog.output_tokens + more.output_tokens)[-MAX_KEPT:],
        step_times=(backlog.step_times + more.step_times)[-MAX_KEPT:],
        handoffs=(backlog.handoffs + more.handoffs)[-MAX_KEPT:],
        host_times=(backlog.host_times + more.host_times)[-MAX_KEPT:],
    )
