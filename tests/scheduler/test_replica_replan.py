"""The scheduler service keeps the deployment's data-parallel replicas R: its re-plans
search that R only, and a plan of another R is never pushed."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.config import SchedulerConfig
from services.scheduler.observations import StageKind, WorkloadObservations
from services.scheduler.problem import PlanProblem, PlanResult, Prediction, SearchStats
from services.scheduler.search.plan import plan
from services.scheduler.service import ReplanReason, SchedulerCore
from tests.scheduler.test_drift import PROFILE, THRESHOLDS, FakeClock, stage_observations
from tests.scheduler.test_replicas import SMALL
from tests.scheduler.test_simulator import toy_problem


class ReplicaPlanner:
    """Plans `free_r` replicas when the problem leaves R open, else the one R it allows
    (or `forced_r` whatever the problem says: a planner that ignores the constraint)."""

    def __init__(self, free_r: int, forced_r: int | None = None) -> None:
        self.free_r, self.forced_r = free_r, forced_r
        self.problems: list[PlanProblem] = []

    def __call__(self, problem: PlanProblem, *, exhaustive: bool = False) -> PlanResult:
        self.problems.append(problem)
        count = self.forced_r or (problem.replicas[0] if problem.replicas else self.free_r)
        schedule = Schedule(ScheduleKind.RRA, 8, 16, num_decode_iterations=4, num_replicas=count)
        prediction = Prediction(schedule, True, 10.0, 320.0, 1.0, (1 << 30,), (0.5,))
        return PlanResult(prediction, True, {"rra": prediction}, prediction, SearchStats(1, 0.0))


def _core(planner: ReplicaPlanner, clock: FakeClock, num_replicas: int | None) -> SchedulerCore:
    config = SchedulerConfig(
        profile=PROFILE,
        num_devices=4,
        num_replicas=num_replicas,
        drift=THRESHOLDS,
        stage_window_size=50,
        replan_min_interval_s=60.0,
    )
    return SchedulerCore(config, planner=planner, clock=clock)


async def _stage_drift(core: SchedulerCore, planner: ReplicaPlanner, clock: FakeClock) -> None:
    """Report encode stages twice as slow as planned, and let the re-plan run."""
    clock.now_s += 61
    slow = stage_observations(planner.problems[0].cost_model, 2.0, 12, StageKind.ENCODE, tp=2)
    core.report(WorkloadObservations("r0", stage_times=tuple(slow)))
    for _ in range(200):
        if len(planner.problems) == 2 and core._replan_task is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no re-plan ran")


def test_a_drift_replan_keeps_the_r_of_the_first_published_schedule() -> None:
    async def scenario() -> None:
        clock, planner = FakeClock(), ReplicaPlanner(free_r=2)
        core = _core(planner, clock, num_replicas=None)
        await core.start()
        assert planner.problems[0].replicas is None
        assert core.current is not None and core.current.prediction.schedule.num_replicas == 2
        planner.free_r = 4  # left free, the re-plan would now pick 4 replicas
        await _stage_drift(core, planner, clock)
        assert planner.problems[1].replicas == (2,)
        assert core.current.version == 2 and core.current.reason == ReplanReason.STAGE_TIME_DRIFT
        assert core.current.prediction.schedule.num_replicas == 2
        await core.close()

    asyncio.run(scenario())


def test_the_configured_r_holds_from_the_first_plan_and_another_is_never_pushed() -> None:
    async def scenario() -> None:
        clock, planner = FakeClock(), ReplicaPlanner(free_r=4)
        core = _core(planner, clock, num_replicas=2)
        await core.start()
        assert planner.problems[0].replicas == (2,)
        assert core.current is not None and core.current.prediction.schedule.num_replicas == 2
        planner.forced_r = 1  # a plan of another R, whatever it was asked
        await _stage_drift(core, planner, clock)
        assert core.current.version == 1  # kept: never pushed
        assert core.current.prediction.schedule.num_replicas == 2
        await core.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", [3, 0])
def test_a_replica_count_that_does_not_divide_the_devices_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="--replicas must divide the 4 devices"):
        SchedulerConfig(num_devices=4, num_replicas=bad)
    with pytest.raises(ValueError, match="must each divide the 4 devices"):
        replace(toy_problem(num_devices=4), replicas=(bad,))


def test_the_search_at_one_r_returns_that_r_for_every_kind() -> None:
    # Dear hops: left free, every kind picks 2 one-device replicas (test_replicas.py).
    problem = replace(toy_problem(transfer_fixed_s=0.05), replicas=(1,))
    result = plan(problem, space=SMALL)
    assert result.chosen is not None
    assert {p.schedule.num_replicas for p in result.best_by_kind.values()} == {1}
