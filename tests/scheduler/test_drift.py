"""Drift detection and re-planning as plain Python: synthetic observation streams, no grpc."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from exegpt.schedule import Schedule, ScheduleKind
from exegpt.workloads import get_task
from services.scheduler.analytic_cost import analytic_cost_model
from services.scheduler.calibration import Calibration, ScaledCostModel, predict_stage_s
from services.scheduler.config import DriftThresholds, SchedulerConfig
from services.scheduler.drift import (
    DriftDetector,
    PlannedWorkload,
    ks_distance,
    ks_noise_floor,
    observed_workload,
)
from services.scheduler.observations import (
    ObservationWindows,
    StageKind,
    StageTimeObservation,
    WorkloadObservations,
)
from services.scheduler.problem import (
    PlanProblem,
    PlanResult,
    Prediction,
    SearchStats,
    WorkloadDistribution,
)
from services.scheduler.service import ReplanReason, SchedulerCore

PROFILE = "analytic:a40:opt-13b"
THRESHOLDS = DriftThresholds(min_observations=200, min_stage_observations=10)


def sample_lengths(task_id: str, num: int, seed: int) -> tuple[list[int], list[int]]:
    task = get_task(task_id)
    rng = np.random.default_rng(seed)
    return task.input.sample(num, rng).tolist(), task.output.sample(num, rng).tolist()


def windows_with(inputs: list[int], outputs: list[int]) -> ObservationWindows:
    windows = ObservationWindows(length_capacity=1000, stage_capacity=100)
    windows.add_lengths(inputs, outputs)
    return windows


def test_ks_distance_and_noise_floor() -> None:
    pmf = WorkloadDistribution.from_task("S").output_pmf
    assert ks_distance(pmf, pmf) == 0
    shifted = np.concatenate([[0.0] * 10, pmf])  # every length 10 tokens longer
    assert 0.2 < ks_distance(shifted, pmf) <= 1
    # More observations or an exact reference: less room for noise.
    assert ks_noise_floor(1000, None, 1e-3) < ks_noise_floor(200, None, 1e-3)
    assert ks_noise_floor(200, None, 1e-3) < ks_noise_floor(200, 200, 1e-3) < 0.2


def test_same_distribution_stream_is_not_drift() -> None:
    planned = PlannedWorkload(WorkloadDistribution.from_task("S"))
    detector = DriftDetector(THRESHOLDS)
    for seed in range(5):
        verdict = detector.evaluate(windows_with(*sample_lengths("S", 1000, seed)), planned)
        assert verdict.input is not None and verdict.output is not None
        assert not verdict.drifted, verdict.describe()
        assert verdict.output.ks_distance < THRESHOLDS.ks_threshold
        assert abs(verdict.output.relative_mean_shift) < 0.05


def test_empirical_plan_against_fresh_sample_of_same_distribution_is_not_drift() -> None:
    inputs, outputs = sample_lengths("C1", 200, seed=1)
    planned = PlannedWorkload(
        WorkloadDistribution.from_lengths("observed", inputs, outputs), 200, 200
    )
    verdict = DriftDetector(THRESHOLDS).evaluate(
        windows_with(*sample_lengths("C1", 200, seed=2)), planned
    )
    assert not verdict.drifted, verdict.describe()


def test_too_few_observations_are_not_judged() -> None:
    planned = PlannedWorkload(WorkloadDistribution.from_task("S"))
    verdict = DriftDetector(THRESHOLDS).evaluate(
        windows_with(*sample_lengths("C2", 199, seed=0)), planned
    )
    assert verdict.input is None and verdict.output is None and not verdict.drifted


def test_mean_shift_of_outputs_is_drift() -> None:
    inputs, outputs = sample_lengths("S", 1000, seed=3)
    longer = [length + 12 for length in outputs]  # about +37% on a 32-token mean
    verdict = DriftDetector(THRESHOLDS).evaluate(
        windows_with(inputs, longer), PlannedWorkload(WorkloadDistribution.from_task("S"))
    )
    assert verdict.length_drifted and not verdict.stage_time_drifted
    assert verdict.input is not None and not verdict.input.drifted
    assert verdict.output is not None and verdict.output.drifted
    assert verdict.output.relative_mean_shift == pytest.approx(0.37, abs=0.05)
    assert "output lengths" in verdict.describe()


def test_distribution_change_is_drift_by_ks_and_replans_for_the_window() -> None:
    windows = windows_with(*sample_lengths("C2", 500, seed=4))
    planned = PlannedWorkload(WorkloadDistribution.from_task("S"))
    verdict = DriftDetector(THRESHOLDS).evaluate(windows, planned)
    assert verdict.input is not None and verdict.input.ks_distance > 0.3
    assert verdict.output is not None and verdict.output.ks_distance > 0.9
    replanned = observed_workload(windows, planned, THRESHOLDS)
    assert replanned.num_input_samples == replanned.num_output_samples == 500
    assert replanned.distribution.mean_output_tokens == pytest.approx(256, rel=0.1)


def stage_observations(
    cost_model: ScaledCostModel, factor: float, num: int, stage: StageKind, tp: int = 1
) -> list[StageTimeObservation]:
    observations = []
    for i in range(num):
        batch = 4 + i % 8
        probe = StageTimeObservation(stage, batch, batch * 200, 10, 1.0, tp_degree=tp)
        predicted_s = predict_stage_s(cost_model, probe)
        observations.append(
            StageTimeObservation(stage, batch, batch * 200, 10, factor * predicted_s, tp)
        )
    return observations


@pytest.mark.parametrize(("factor", "drifted"), [(1.6, True), (0.5, True), (1.1, False)])
def test_stage_time_off_the_prediction_is_drift(factor: float, drifted: bool) -> None:
    cost_model = ScaledCostModel(analytic_cost_model("a40:opt-13b"))
    windows = ObservationWindows(length_capacity=1000, stage_capacity=100)
    for observation in stage_observations(cost_model, factor, 30, StageKind.DECODE):
        ratio = observation.measured_s / predict_stage_s(cost_model, observation)
        windows.add_stage_ratio(StageKind.DECODE, ratio)
    planned = PlannedWorkload(WorkloadDistribution.from_task("S"))
    verdict = DriftDetector(THRESHOLDS).evaluate(windows, planned)
    assert verdict.stage_time_drifted is drifted and not verdict.length_drifted
    assert verdict.stage_time_ratios[StageKind.DECODE] == pytest.approx(factor)
    assert StageKind.ENCODE not in verdict.stage_time_ratios  # no encode observations


def test_scaled_cost_model_scales_compute_only() -> None:
    base = analytic_cost_model("a40:opt-13b")
    start = Calibration({StageKind.ENCODE: 2.0}, {StageKind.ENCODE: 10})
    scaled = ScaledCostModel(base, calibration=start).rescaled(
        {StageKind.ENCODE: 1.5, StageKind.DECODE: 0.5}, {StageKind.ENCODE: 5, StageKind.DECODE: 7}
    )
    assert scaled.calibration.counts == {StageKind.ENCODE: 15, StageKind.DECODE: 7}
    assert scaled.encode_rest_s(512, 2) == pytest.approx(3.0 * base.encode_rest_s(512, 2))
    assert scaled.decode_rest_s(8, 1) == pytest.approx(0.5 * base.decode_rest_s(8, 1))
    assert scaled.allreduce_s(1 << 20, 2) == base.allreduce_s(1 << 20, 2)
    assert scaled.kv_bytes_per_token(2) == base.kv_bytes_per_token(2)
    encode = StageTimeObservation(StageKind.ENCODE, 4, 1024, 10, 1.0, tp_degree=2)
    tp2_compute_s = 10 * (base.encode_attention_s(4, 256, 2) + base.encode_rest_s(1024, 2))
    assert predict_stage_s(base, encode) > tp2_compute_s  # plus the all-reduces
    with pytest.raises(ValueError, match="no timings for TP degree 16"):
        ScaledCostModel(base, tp_degrees=(2, 16))


def test_bad_stage_time_observations_are_refused() -> None:
    with pytest.raises(ValueError, match="measured_s"):
        StageTimeObservation(StageKind.ENCODE, 4, 100, 2, measured_s=math.nan)
    with pytest.raises(ValueError, match="num_tokens"):
        StageTimeObservation(StageKind.DECODE, 4, 3, 2, measured_s=0.1)


# ---- the core: re-plan on drift, rate-limited ----------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class RecordingPlanner:
    """Answers at once with a schedule whose B_E encodes the planned mean output length."""

    def __init__(self) -> None:
        self.problems: list[PlanProblem] = []

    def __call__(self, problem: PlanProblem, *, exhaustive: bool = False) -> PlanResult:
        self.problems.append(problem)
        batch = max(1, round(problem.workload.mean_output_tokens))
        prediction = Prediction(
            schedule=Schedule(ScheduleKind.RRA, batch, 2 * batch, num_decode_iterations=4),
            feasible=True,
            throughput_seq_s=10.0,
            throughput_tokens_s=320.0,
            latency_s=1.0,
            memory_bytes_per_device=(1 << 30,),
            utilisation_per_device=(0.5,),
        )
        return PlanResult(prediction, True, {"rra": prediction}, prediction, SearchStats(1, 0.0))


def make_core(clock: FakeClock, planner: RecordingPlanner) -> SchedulerCore:
    config = SchedulerConfig(
        profile=PROFILE,
        workload="task:S",
        num_devices=4,
        drift=THRESHOLDS,
        length_window_size=400,
        stage_window_size=50,
        replan_min_interval_s=60.0,
    )
    return SchedulerCore(config, planner=planner, clock=clock)


async def next_version(core: SchedulerCore, after_version: int) -> int:
    with core.subscribe("test", after_version) as subscription:
        async for published in subscription:
            return published.version
    raise AssertionError("watch ended")


def test_core_replans_on_length_drift_at_most_once_per_interval() -> None:
    async def scenario() -> None:
        clock, planner = FakeClock(), RecordingPlanner()
        core = make_core(clock, planner)
        await core.start()
        assert core.current is not None and core.current.version == 1
        assert core.current.reason == ReplanReason.INITIAL
        clock.now_s += 61
        inputs, outputs = sample_lengths("C2", 400, seed=5)
        ack = core.report(WorkloadObservations("r0", tuple(inputs), tuple(outputs)))
        assert ack.current_version == 1  # the re-plan runs off the report path
        assert await asyncio.wait_for(next_version(core, 1), 5) == 2
        assert core.current.reason == ReplanReason.LENGTH_DRIFT
        assert core.current.verdict is not None and core.current.verdict.output is not None
        assert planner.problems[-1].workload.mean_output_tokens == pytest.approx(256, rel=0.1)
        assert len(planner.problems) == 2
        # Drift again at once (now back to S): refused by the rate limit...
        inputs, outputs = sample_lengths("S", 400, seed=6)
        core.report(WorkloadObservations("r0", tuple(inputs), tuple(outputs)))
        await asyncio.sleep(0.05)
        assert len(planner.problems) == 2 and core.current.version == 2
        # ...until the interval has passed.
        clock.now_s += 61
        core.report(WorkloadObservations("r0", (300,), (30,)))
        assert await asyncio.wait_for(next_version(core, 2), 5) == 3
        await core.close()

    asyncio.run(scenario())


def test_core_recalibrates_the_cost_model_on_stage_time_drift() -> None:
    async def scenario() -> None:
        clock, planner = FakeClock(), RecordingPlanner()
        core = make_core(clock, planner)
        await core.start()
        clock.now_s += 61
        cost_model = planner.problems[0].cost_model
        assert isinstance(cost_model, ScaledCostModel)
        slow = stage_observations(cost_model, 2.0, 12, StageKind.ENCODE, tp=2)
        core.report(WorkloadObservations("r0", stage_times=tuple(slow)))
        assert await asyncio.wait_for(next_version(core, 1), 5) == 2
        assert core.current is not None
        assert core.current.reason == ReplanReason.STAGE_TIME_DRIFT
        replanned = planner.problems[-1].cost_model
        assert isinstance(replanned, ScaledCostModel)
        assert replanned.calibration.factor(StageKind.ENCODE) == pytest.approx(2.0)
        assert replanned.calibration.factor(StageKind.DECODE) == 1.0
        assert planner.problems[-1].workload is planner.problems[0].workload
        # Times that now match the recalibrated model are no drift.
        clock.now_s += 61
        on_time = stage_observations(replanned, 1.0, 12, StageKind.ENCODE, tp=2)
        core.report(WorkloadObservations("r0", stage_times=tuple(on_time)))
        await asyncio.sleep(0.05)
        assert core.current.version == 2 and len(planner.problems) == 2
        await core.close()

    asyncio.run(scenario())
