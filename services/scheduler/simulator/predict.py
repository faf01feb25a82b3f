"""XSimulator: what a schedule delivers, predicted from a profile and the length distributions.

Plain Python, deterministic, no grpc. `simulate(problem, schedule)` returns a `Prediction`
(throughput in sequences/s and generated tokens/s, latency of a p99-output-length sequence,
memory and utilisation per device); `timeline(problem, schedule)` returns the per-device
events of a steady-state cycle for plots. `Simulator` keeps per-layer costs memoised across
calls, which the search relies on.

How each kind is modelled is documented in its module: `rra` (RRA), `waa` (WAA-C / WAA-M,
and the micro-batched decode pipeline), `baselines` (static batching and continuous
batching); `KINDS` below maps each kind to its model, the one place the simulator dispatches
on kind. The shared pieces are in `common` (expected workloads, per-layer costs, memory, a batch's
time per stage and through the pipeline).

A schedule with R data-parallel replicas (`num_replicas`) is R copies of the same schedule,
each on N / R devices: the prediction is one replica's (one `Simulator` of N / R devices,
sharing these costs) with its throughput times R, its latency (a replica serves 1/R of the
load at the same steady state), and its per-device memory and utilisation repeated for each
replica's devices.

A schedule whose memory does not fit is returned with `feasible=False` and a reason, its
throughput and latency still computed (the search bounds boxes with them); it is never
clipped to fit. Invalid input (a TP degree the profile lacks, more devices than exist,
a WAA split leaving no decode device) raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from exegpt.placement import Placement, Stage, placement_from_layout
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.problem import PlanProblem, Prediction
from services.scheduler.simulator import baselines, continuous, rra, waa
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

    def __init__(self, problem: PlanProblem, costs: LayerCosts | None = None) -> None:
        self.problem = problem
        self.stats = costs.stats if costs else WorkloadStats.from_workload(problem.workload)
        self.costs = costs or LayerCosts(problem.cost_model, self.stats)
        self._replicas: dict[int, Simulator] = {}

    @property
    def num_devices(self) -> int:
        return self.problem.num_devices

    def simulate(self, schedule: Schedule) -> Prediction:
        if schedule.num_replicas > 1:
            return self._replicated(schedule)
        self._validate(schedule)
        return KINDS[schedule.kind].simulate(self, schedule)

    def timeline(self, schedule: Schedule) -> list[TimelineEvent]:
        if schedule.num_replicas > 1:
            per = self.num_devices // schedule.num_replicas
            one = self.replica_simulator(schedule.num_replicas).timeline(
                replace(schedule, num_replicas=1)
            )
            events = [
                replace(event, device=event.device + replica * per)
                for replica in range(schedule.num_replicas)
                for event in one
            ]
        else:
            self._validate(schedule)
            events = KINDS[schedule.kind].timeline(self, schedule)
        return sorted(events, key=lambda e: (e.device, e.start_s, e.end_s))

    def placement(self, schedule: Schedule) -> Placement:
        """Where the schedule puts each layer of ONE replica, exactly as simulated: the runner
        deploys this on each of the `num_replicas` replicas (`exegpt plan --json` writes it
        beside the schedule)."""
        if schedule.num_replicas > 1:
            return self.replica_simulator(schedule.num_replicas).placement(
                replace(schedule, num_replicas=1)
            )
        self._validate(schedule)
        stages, num_encode_stages = KINDS[schedule.kind].stages(self, schedule)
        return placement_from_layout(
            stages,
            is_encoder_decoder=self.costs.model.shape.is_encoder_decoder,
            num_encode_stages=num_encode_stages,
        )

    def replica_simulator(self, num_replicas: int) -> Simulator:
        """The simulator of one of `num_replicas` data-parallel replicas: N / R devices, the
        same profile, workload, memory and (memoised) costs."""
        if num_replicas < 1 or self.num_devices % num_replicas:
            raise ValueError(
                f"{num_replicas} replicas do not divide {self.num_devices} devices evenly"
            )
        if num_replicas == 1:
            return self
        simulator = self._replicas.get(num_replicas)
        if simulator is None:
            per = self.num_devices // num_replicas
            kinds = self.problem.kinds if per > 1 else (ScheduleKind.RRA,)
            problem = replace(self.problem, num_devices=per, kinds=kinds, replicas=None)
            simulator = self._replicas[num_replicas] = Simulator(problem, self.costs)
        return simulator

    def _replicated(self, schedule: Schedule) -> Prediction:
        """R copies of one replica's prediction: throughput x R, the same latency, the
        per-device figures repeated for every replica's devices."""
        count = schedule.num_replicas
        one = self.replica_simulator(count).simulate(replace(schedule, num_replicas=1))
        return replace(
            one,
            schedule=replace(one.schedule, num_replicas=count),
            throughput_seq_s=one.throughput_seq_s * count,
            throughput_tokens_s=one.throughput_tokens_s * count,
            memory_bytes_per_device=one.memory_bytes_per_device * count,
            utilisation_per_device=one.utilisation_per_device * count,
        )

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
        if not reason and schedule.num_micro_batches > outcome.decoding_rows:
            reason = (
                f"{schedule.num_micro_batches} micro-batches but only "
                f"{outcome.decoding_rows:.1f} sequences in the decode batch"
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

    def _rra_timeline(self, schedule: Schedule) -> list[TimelineEvent]:
        events: list[TimelineEvent] = []
        rra.run_cycle(self.costs, schedule, self.num_devices, events)
        return events

    def _rra_stages(self, schedule: Schedule) -> tuple[list[Stage], int]:
        return rra.layout(self.costs, schedule, self.num_devices).stages, 0

    def _waa_timeline(self, schedule: Schedule) -> list[TimelineEvent]:
        return waa.timeline(self.costs, schedule, self.num_devices)

    def _waa_stages(self, schedule: Schedule) -> tuple[list[Stage], int]:
        outcome = waa.run(self.costs, schedule, self.num_devices)
        return outcome.encode_stages + outcome.decode_stages, len(outcome.encode_stages)

    def _baseline(self, schedule: Schedule, outcome: baselines.BaselineOutcome) -> Prediction:
        return self._prediction(
            schedule,
            outcome.throughput_seq_s,
            outcome.throughput_tokens_s,
            outcome.latency_s,
            outcome.memory_bytes,
            self._stage_utilisation(outcome.stages, outcome.busy_s_per_stage, outcome.period_s),
            idle_stage_reason(outcome.stages),
        )

    def _baseline_stages(self, schedule: Schedule) -> tuple[list[Stage], int]:
        return baselines.even_stages(self.costs, schedule.tp_degree, self.num_devices), 0

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


@dataclass(frozen=True)
class KindModel:
    """How the simulator models one kind of schedule: its prediction, the events of its
    timeline, and its stages (with how many of them only encode: WAA's, 0 otherwise)."""

    simulate: Callable[[Simulator, Schedule], Prediction]
    timeline: Callable[[Simulator, Schedule], list[TimelineEvent]]
    stages: Callable[[Simulator, Schedule], tuple[list[Stage], int]]


BaselineRun = Callable[..., baselines.BaselineOutcome]


def _baseline_model(run: BaselineRun) -> KindModel:
    """A baseline's model from its run (`run(costs, schedule, num_devices, events=None)`)."""

    def simulate(simulator: Simulator, schedule: Schedule) -> Prediction:
        return simulator._baseline(schedule, run(simulator.costs, schedule, simulator.num_devices))

    def timeline(simulator: Simulator, schedule: Schedule) -> list[TimelineEvent]:
        events: list[TimelineEvent] = []
        run(simulator.costs, schedule, simulator.num_devices, events)
        return events

    return KindModel(simulate, timeline, Simulator._baseline_stages)


_WAA = KindModel(Simulator._waa, Simulator._waa_timeline, Simulator._waa_stages)

# The one place the simulator dispatches on a schedule's kind.
KINDS: dict[ScheduleKind, KindModel] = {
    ScheduleKind.RRA: KindModel(Simulator._rra, Simulator._rra_timeline, Simulator._rra_stages),
    ScheduleKind.WAA_C: _WAA,
    ScheduleKind.WAA_M: _WAA,
    ScheduleKind.STATIC: _baseline_model(baselines.run_static),
    ScheduleKind.CONTINUOUS: _baseline_model(continuous.run_continuous),
}


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
