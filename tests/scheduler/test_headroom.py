"""The latency headroom: the planner chooses against bound x (1 - headroom), on hand-made
costs (tests/scheduler/toy_cost.py), in `exegpt plan` and in the scheduler's re-plans."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from exegpt.commands.cli import main
from exegpt.headroom import DEFAULT_LATENCY_HEADROOM, planning_bound_s
from services.scheduler.config import SchedulerConfig
from services.scheduler.problem import PlanProblem
from services.scheduler.search.plan import SearchSpace, plan
from services.scheduler.server import start_scheduler
from tests.conftest import BackgroundLoop
from tests.scheduler.test_service import BOUND_S, drift_config, next_update, stub
from tests.scheduler.toy_cost import ToyCostModel, decoder_only_shape, toy_workload

SPACE = SearchSpace(max_encode_batch_size=32, max_running_batch_size=128)
HEADROOM = 0.1


def toy_problem(bound_s: float, headroom: float = 0.0) -> PlanProblem:
    model = ToyCostModel(decoder_only_shape())
    return PlanProblem(model, toy_workload(), bound_s, 2, 10**9, latency_headroom=headroom)


def test_no_headroom_chooses_the_best_within_the_bound_itself() -> None:
    problem = toy_problem(0.3)
    chosen = plan(problem, space=SPACE).chosen
    every = plan(problem, exhaustive=True, space=SPACE).evaluated
    within = [p for p in every if p.feasible and p.latency_s <= 0.3]
    assert chosen is not None
    assert chosen.throughput_seq_s == pytest.approx(max(p.throughput_seq_s for p in within))


def test_headroom_excludes_a_schedule_predicted_between_the_two_bounds() -> None:
    first = plan(toy_problem(0.3), space=SPACE).chosen
    assert first is not None
    # A bound that puts that choice halfway into the headroom: inside the bound, but over
    # bound x (1 - headroom), so the headroom must choose another.
    bound_s = first.latency_s / (1 - HEADROOM / 2)
    without = plan(toy_problem(bound_s), space=SPACE).chosen
    kept = plan(toy_problem(bound_s, HEADROOM), space=SPACE).chosen
    assert without is not None and kept is not None
    assert without.latency_s > bound_s * (1 - HEADROOM)  # today's choice sits in the headroom
    assert kept.latency_s <= bound_s * (1 - HEADROOM)
    assert kept.schedule != without.schedule
    # ... and it is exactly the choice for the smaller bound with no headroom.
    smaller = plan(toy_problem(bound_s * (1 - HEADROOM)), space=SPACE).chosen
    assert smaller is not None and kept.schedule == smaller.schedule


@pytest.mark.parametrize("headroom", [-0.01, 1.0, 1.5, math.nan])
def test_invalid_headroom_is_a_clear_error(headroom: float) -> None:
    with pytest.raises(ValueError, match=r"latency headroom must be a fraction in \[0, 1\)"):
        toy_problem(1.0, headroom)
    with pytest.raises(ValueError, match="latency headroom"):
        SchedulerConfig(latency_headroom=headroom)
    with pytest.raises(ValueError, match="latency headroom"):
        planning_bound_s(1.0, headroom)


def test_an_unbounded_plan_stays_unbounded() -> None:
    assert toy_problem(math.inf, HEADROOM).planning_bound_s == math.inf


PLAN = ["plan", "--profile", "analytic:cpu", "--workload", "task:S", "--gpus", "2"]


def test_plan_cli_prints_and_records_the_headroom(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "plan.json"
    assert main([*PLAN, "--latency-bound", "2.0", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    factor = 1 - DEFAULT_LATENCY_HEADROOM
    assert f"latency bound 2.000 s, planned against {factor:.2f} x bound" in out
    report = json.loads(report_path.read_text())
    assert report["latency_bound_s"] == 2.0  # the promise stays the user's bound
    assert report["latency_headroom"] == DEFAULT_LATENCY_HEADROOM
    assert report["planned_bound_s"] == pytest.approx(2.0 * factor)
    assert report["predicted"]["latency_s"] <= 2.0 * factor
    for kind in report["best_by_kind"].values():  # the baselines under the same rule
        assert kind["latency_s"] <= 2.0 * factor
    none_path = tmp_path / "none.json"
    argv = [*PLAN, "--latency-bound", "2.0", "--latency-headroom", "0", "--json", str(none_path)]
    assert main(argv) == 0
    assert "planned against" not in capsys.readouterr().out
    assert json.loads(none_path.read_text())["planned_bound_s"] == 2.0


@pytest.mark.parametrize("value", ["1", "-0.2", "abc"])
def test_plan_cli_refuses_a_bad_headroom(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*PLAN, "--latency-bound", "2.0", "--latency-headroom", value])
    assert exited.value.code == 2
    assert "--latency-headroom" in capsys.readouterr().err


def test_scheduler_plans_and_replans_within_the_headroom(background_loop: BackgroundLoop) -> None:
    """The scheduler's first plan and its drift re-plan are both chosen against
    bound x (1 - headroom), and the pushed bound is still the user's."""
    from exegpt.v1 import scheduler_pb2
    from tests.scheduler.test_service import decode_stage_times

    headroom = 0.4
    planned_s = BOUND_S * (1 - headroom)

    async def reports(factor: float, num: int) -> AsyncIterator[scheduler_pb2.WorkloadReport]:
        yield scheduler_pb2.WorkloadReport(stage_times=decode_stage_times(factor, num))

    async def go() -> tuple[scheduler_pb2.ScheduleUpdate, scheduler_pb2.ScheduleUpdate]:
        running = await start_scheduler(drift_config(latency_headroom=headroom))
        channel, client = stub(running.address)
        try:
            watch = client.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id="r0"))
            updates = watch.__aiter__()
            initial = await next_update(updates)
            await client.ReportWorkload(reports(3.0, 30))  # decode 3x slower: re-plan
            update = await next_update(updates)
            watch.cancel()
            return initial, update
        finally:
            await channel.close()
            await running.stop(0.5)

    initial, update = background_loop.run(go())
    assert update.version == 2
    assert update.reason == scheduler_pb2.REPLAN_REASON_STAGE_TIME_DRIFT
    for pushed in (initial, update):
        assert pushed.latency_bound_s == BOUND_S
        assert pushed.prediction.latency_s <= planned_s
    without = background_loop.run(_first_latency(drift_config()))
    assert without > planned_s  # without the headroom the first plan sits inside it


async def _first_latency(config: SchedulerConfig) -> float:
    from exegpt.v1 import scheduler_pb2

    running = await start_scheduler(replace(config, latency_headroom=0.0))
    channel, client = stub(running.address)
    try:
        watch = client.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id="r0"))
        initial = await next_update(watch.__aiter__())
        watch.cancel()
        return initial.prediction.latency_s
    finally:
        await channel.close()
        await running.stop(0.5)


def test_up_plan_chooses_within_the_headroom_and_says_so(
    steady_tiny_profile: Path, tmp_path: Path
) -> None:
    from exegpt.commands import autoplan

    request = autoplan.PlanRequest(
        workload="task:S", length_scale=0.25, latency_headroom=0.2, threads=1, profile_dir=tmp_path
    )
    auto = autoplan.make_plan(request, steady_tiny_profile, tmp_path)
    assert f"latency bound {auto.bound_s:.3f} s, planned against 0.80 x bound" in (
        autoplan.format_choice(auto)
    )
    assert auto.plan.latency_bound_s == pytest.approx(auto.bound_s)  # the user's bound
    assert auto.report["planned_bound_s"] == pytest.approx(0.8 * auto.bound_s)
    assert auto.predicted["latency_s"] <= 0.8 * auto.bound_s


def test_a_schedule_inside_the_headroom_serves_when_nothing_meets_the_planned_bound() -> None:
    # The toy problem's lowest reachable latency lies between 0.9 x 0.040 s and 0.040 s:
    # nothing meets the planned bound, yet the user's is met: the lowest-latency schedule
    # serves (the most margin left), and the result says the bound is met.
    lowest = plan(toy_problem(math.inf), space=SPACE).evaluated
    floor_s = min(p.latency_s for p in lowest if p.feasible)
    bound_s = floor_s / 0.95  # floor = 0.95 x bound: inside a 10% headroom
    result = plan(toy_problem(bound_s, HEADROOM), space=SPACE)
    assert result.meets_bound and result.chosen is not None
    assert planning_bound_s(bound_s, HEADROOM) < result.chosen.latency_s <= bound_s
    assert result.chosen.latency_s == pytest.approx(floor_s, rel=0.02)
    # Below the floor nothing is met, with or without headroom.
    assert not plan(toy_problem(floor_s * 0.9, HEADROOM), space=SPACE).meets_bound


@pytest.mark.parametrize("exhaustive", [True, False])
def test_at_the_lowest_latency_the_most_throughput_serves(exhaustive: bool) -> None:
    # Nothing meets the planned bound, the user's is met: of the schedules at the lowest
    # latency, baselines included, the one serving the most sequences a second is chosen (a
    # static batch of 1 can be as fast as RRA's and serve twice as many).
    lowest = plan(toy_problem(math.inf), exhaustive=True, space=SPACE).evaluated
    floor_s = min(p.latency_s for p in lowest if p.feasible)
    result = plan(toy_problem(floor_s / 0.95, HEADROOM), exhaustive=exhaustive, space=SPACE)
    assert result.meets_bound and result.chosen is not None
    every = plan(toy_problem(floor_s / 0.95, HEADROOM), exhaustive=True, space=SPACE).evaluated
    at_floor = [p for p in every if p.feasible and p.latency_s == floor_s]
    assert result.chosen.latency_s == floor_s
    assert result.chosen.throughput_seq_s == max(p.throughput_seq_s for p in at_floor)
