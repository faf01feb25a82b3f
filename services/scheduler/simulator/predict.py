"""XSimulator: what a schedule delivers, predicted from a profile and the length distributions.

Plain Python, deterministic, no grpc. `simulate(problem, schedule)` returns a `Prediction`
(throughput in sequences/s and generated tokens/s, latency of a p99-output-length sequence,
memory and utilisation per device); `timeline(problem, schedule)` returns the per-device
events of a steady-state cycle for plots. `Simulator` keeps per-layer costs memoised across
calls, which the search relies on.

How each kind is modelled is documented in its module: `simulator_rra` (RRA), `simulator_waa`
(WAA-C / WAA-M, and the micro-batched decode pipeline), `baselines` (static batching and
continuous batching); the shared pieces (expected workloads, stages, layer split) are in
`sim_common`. A schedule whose memory does not fit is returned with `feasible=False` and a
reason, its throughput and latency still computed (the search bounds boxes with them); it is
never clipped to fit. Invalid input (a TP degree the profile lacks, more devices than exist,
a WAA split leaving no decode device) raises ValueError.
"""

from __future__ import annotations

import math

from exegpt.placement import Placement, Stage, placement_from_layout
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.problem import PlanProblem, Prediction
from services.scheduler.simulator import baselines, rra, waa
from services.scheduler.simulator.common import (
    LayerCosts,
    TimelineEvent,
    WorkloadStats,
    idle_stage_reason,
    memory_reason,
)

__all__ = ["Simulator", "TimelineEvent", "simulate", "timeline"]


class Simulator:
    """The XSimulator for one `PlanProblem` (profile, workload, devices, memory)."""

    def __init__(self, problem: PlanProblem) -> None:
        self.problem = problem
        self.stats = WorkloadStats.from_workload(problem.workload)
        self.costs = LayerCosts(problem.cost_model, self.stats)

    @property
    def num_devices(self) -> int:
        return self.problem.num_devices

    def simulate(self, schedule: Schedule) -> Prediction:
        self._validate(schedule)
        if schedule.kind == ScheduleKind.RRA:
            return self._rra(schedule)
        if schedule.kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M):
            return self._waa(schedule)
        if schedule.kind == ScheduleKind.STATIC:
            outcome = baselines.run_static(self.costs, schedule, self.num_devices)
        else:
            outcome = baselines.run_continuous(self.costs, schedule, self.num_devices)
        return self._prediction(
            schedule,
            outcome.throughput_seq_s,
            outcome.throughput_tokens_s,
            outcome.latency_s,
            outcome.memory_bytes,
            self._stage_utilisation(outcome.stages, outcome.busy_s_per_stage, outcome.period_s),
            idle_stage_reason(outcome.stages),
        )

    def timeline(self, schedule: Schedule) -> list[TimelineEvent]:
        self._validate(schedule)
        events: list[TimelineEvent] = []
        if schedule.kind == ScheduleKind.RRA:
            rra.run_cycle(self.costs, schedule, self.num_devices, events)
        elif schedule.kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M):
            events = waa.timeline(self.costs, schedule, self.num_devices)
        elif schedule.kind == ScheduleKind.STATIC:
            baselines.run_static(self.costs, schedule, self.num_devices, events)
        else:
            baselines.run_continuous(self.costs, schedule, self.num_devices, events)
        return sorted(events, key=lambda e: (e.device, e.start_s, e.end_s))

    def placement(self, schedule: Schedule) -> Placement:
        """Where the schedule puts each layer, exactly as simulated: the runner deploys this
        (`exegpt plan --json` writes it beside the schedule)."""
        self._validate(schedule)
        is_encoder_decoder = self.costs.model.shape.is_encoder_decoder
        if schedule.kind == ScheduleKind.RRA:
            stages = rra.layout(self.costs, schedule, self.num_devices).stages
            return placement_from_layout(stages, is_encoder_decoder=is_encoder_decoder)
        if schedule.kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M):
            outcome = waa.run(self.costs, schedule, self.num_devices)
            return placement_from_layout(
                outcome.encode_stages + outcome.decode_stages,
                is_encoder_decoder=is_encoder_decoder,
                num_encode_stages=len(outcome.encode_stages),
            )
        stages = baselines.even_stages(self.costs, schedule.tp_degree, self.num_devices)
        return placement_from_layout(stages, is_encoder_decoder=is_encoder_decoder)

    # ---- kinds -----------------------------------------------------------------------------

    def _rra(self, schedule: Schedule) -> Prediction:
        outcome = rra.run_cycle(self.costs, schedule, self.num_devices)
        memory = rra.memory_bytes(self.costs, outcome.layout, self.num_devices)
        throughput = schedule.encode_batch_size / outcome.cycle_s
        return self._prediction(
            rra.normalised(schedule, outcome.layout),
            throughput,
            throughput * self.stats.mean_output_tokens,
            outcome.latency_s,
            memory,
            self._stage_utilisation(
                outcome.layout.stages, outcome.busy_s_per_stage, outcome.cycle_s
            ),
            idle_stage_reason(outcome.layout.stages),
        )

    def _waa(self, schedule: Schedule) -> Prediction:
        outcome = waa.run(self.costs, schedule, self.num_devices)
        memory = waa.memory_bytes(self.costs, outcome, schedule, self.num_devices)
        throughput = schedule.encode_batch_size / outcome.cycle_s
        reason = idle_stage_reason(outcome.encode_stages + outcome.decode_stages)
        if not reason and schedule.num_micro_batches > outcome.decode_batch:
            reason = (
                f"{schedule.num_micro_batches} micro-batches but only "
                f"{outcome.decode_batch:.1f} sequences in the decode batch"
            )
        return self._prediction(
            waa.normalised(schedule, outcome),
            throughput,
            throughput * self.stats.mean_output_tokens,
            outcome.latency_s,
            memory,
            waa.utilisation(outcome, schedule, self.num_devices),
            reason,
        )

    # ---- helpers ---------------------------------------------------------------------------

    def _prediction(
        self,
        schedule: Schedule,
        throughput_seq_s: float,
        throughput_tokens_s: float,
        latency_s: float,
        memory: list[int],
        utilisation: list[float],
        reason: str = "",
    ) -> Prediction:
        reason = memory_reason(memory, self.problem.device_memory_bytes) or reason
        return Prediction(
            schedule=schedule,
            feasible=not reason,
            throughput_seq_s=throughput_seq_s,
            throughput_tokens_s=throughput_tokens_s,
            latency_s=latency_s,
            memory_bytes_per_device=tuple(memory),
            utilisation_per_device=tuple(utilisation),
            reason=reason,
        )

    def _stage_utilisation(
        self, stages: list[Stage], busy_s: list[float], period_s: float
    ) -> list[float]:
        utilisation = [0.0] * self.num_devices
        for stage, busy in zip(stages, busy_s, strict=True):
            for device in stage.devices:
                utilisation[device] = min(1.0, busy / period_s) if period_s > 0 else 0.0
        return utilisation

    def _validate(self, schedule: Schedule) -> None:
        num_devices = self.num_devices
        if schedule.num_tp_devices:
            self.costs.check_tp(schedule.tp_degree)
        if schedule.num_tp_devices > num_devices:
            raise ValueError(f"{schedule.num_tp_devices} TP devices but only {num_devices} devices")
        if schedule.kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M):
            if not 1 <= schedule.num_encode_devices < num_devices:
                raise ValueError(
                    f"WAA needs 1..{num_devices - 1} encode devices on {num_devices} devices, "
                    f"got {schedule.num_encode_devices}"
                )
            if schedule.num_tp_devices > num_devices - schedule.num_encode_devices:
                raise ValueError("WAA applies TP to decode devices: too many TP devices")
        if schedule.kind.is_baseline:
            self.costs.check_tp(schedule.tp_degree)
            if num_devices % schedule.tp_degree:
                raise ValueError(
                    f"a baseline's TP degree {schedule.tp_degree} must divide {num_devices}"
                )
            if schedule.tp_degree > 1 and schedule.num_tp_devices != num_devices:
                raise ValueError("a baseline applies its TP degree to every device")


def simulate(problem: PlanProblem, schedule: Schedule) -> Prediction:
    """One-off prediction (build a `Simulator` to reuse memoised costs)."""
    return Simulator(problem).simulate(schedule)


def timeline(problem: PlanProblem, schedule: Schedule) -> list[TimelineEvent]:
    """Per-device events of one steady-state cycle (a few cycles for WAA and continuous)."""
    return Simulator(problem).timeline(schedule)


def is_meeting(prediction: Prediction, latency_bound_s: float) -> bool:
    """Feasible and within the latency bound (math.inf: any latency)."""
    return prediction.feasible and (
        math.isinf(latency_bound_s) or prediction.latency_s <= latency_bound_s
    )
