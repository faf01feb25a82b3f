"""XScheduler: branch-and-bound against exhaustive search on random profiles and workloads."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from exegpt.schedule import Schedule, ScheduleKind
from exegpt.workloads import LengthSpec
from services.scheduler.analytic_cost import analytic_cost_model
from services.scheduler.problem import PlanProblem, PlanResult, Prediction, WorkloadDistribution
from services.scheduler.search.plan import SearchSpace, plan, static_latency_bounds
from services.scheduler.search.space import better, faster
from services.scheduler.simulator.predict import is_meeting
from tests.scheduler.random_cost import random_cost_model
from tests.scheduler.toy_cost import BumpyCostModel, decoder_only_shape, toy_workload

NUM_RANDOM_CASES = 50
SMALL_SPACE = SearchSpace(max_encode_batch_size=32, max_running_batch_size=128)


def random_problem(seed: int) -> PlanProblem:
    """A random model, device, workload, device count, memory and latency bound."""
    rng = np.random.default_rng(seed)
    cost_model = random_cost_model(seed)
    mean_in = int(rng.integers(16, 256))
    mean_out = int(rng.integers(3, 14))
    workload = WorkloadDistribution(
        f"random-{seed}",
        LengthSpec(mean_in, mean_in * rng.uniform(0.2, 1.0), 2 * mean_in).pmf(),
        LengthSpec(
            mean_out, mean_out * rng.uniform(0.2, 0.8), int(rng.integers(mean_out + 2, 25))
        ).pmf(),
    )
    num_devices = int(rng.integers(2, 5))
    shape = cost_model.shape
    weights = shape.num_decode_layers * cost_model.decode_layer_weight_bytes(1)
    if shape.is_encoder_decoder:
        weights += shape.num_encode_layers * cost_model.encode_layer_weight_bytes(1)
    weights += cost_model.embedding_weight_bytes()
    memory = int(weights / num_devices * rng.uniform(1.5, 6.0))
    problem = PlanProblem(cost_model, workload, math.inf, num_devices, memory)
    if rng.random() < 0.15:
        return problem
    try:
        (bound_s,) = static_latency_bounds(problem, (rng.uniform(0.05, 0.9),), SMALL_SPACE)
    except ValueError:  # the static baseline does not fit at all: keep the problem unbounded
        return problem
    return replace(problem, latency_bound_s=bound_s)


def _throughput(result: PlanResult, kind: str) -> float:
    best = result.best_by_kind.get(kind)
    return best.throughput_seq_s if best else 0.0


def test_branch_and_bound_reaches_the_exhaustive_optimum() -> None:
    evaluations_bnb = evaluations_exhaustive = 0
    num_meeting = 0
    for seed in range(NUM_RANDOM_CASES):
        problem = random_problem(seed)
        fast = plan(problem, space=SMALL_SPACE)
        full = plan(problem, exhaustive=True, space=SMALL_SPACE)
        assert fast.meets_bound == full.meets_bound, seed
        tolerance = 1 + problem.throughput_tolerance
        for kind in ("rra", "waa-c", "waa-m"):
            assert _throughput(fast, kind) * tolerance >= _throughput(full, kind), (seed, kind)
        if full.chosen is not None:
            num_meeting += 1
            assert fast.chosen is not None
            assert is_meeting(fast.chosen, problem.latency_bound_s)
            assert fast.chosen.throughput_seq_s * tolerance >= full.chosen.throughput_seq_s, seed
        assert fast.search.num_evaluations <= full.search.num_evaluations
        evaluations_bnb += fast.search.num_evaluations
        evaluations_exhaustive += full.search.num_evaluations
    assert num_meeting >= NUM_RANDOM_CASES // 2  # most cases are constrained, not vacuous
    assert evaluations_bnb * 4 < evaluations_exhaustive


def test_unmeetable_bound_reports_the_lowest_latency() -> None:
    problem = replace(random_problem(3), latency_bound_s=1e-9)
    fast = plan(problem, space=SMALL_SPACE)
    full = plan(problem, exhaustive=True, space=SMALL_SPACE)
    for result in (fast, full):
        assert not result.meets_bound and result.chosen is None
        assert result.lowest_latency is not None and result.lowest_latency.feasible
        assert result.lowest_latency.throughput_seq_s > 0
    assert fast.lowest_latency.latency_s == pytest.approx(full.lowest_latency.latency_s)


@pytest.fixture(scope="module")
def opt_result() -> tuple[PlanProblem, PlanResult]:
    problem = PlanProblem(
        analytic_cost_model("a40:opt-13b"),
        WorkloadDistribution.from_task("S"),
        8.0,
        4,
        48 * 1024**3,
    )
    return problem, plan(problem)


def test_plan_reports_every_kind_and_both_baselines(
    opt_result: tuple[PlanProblem, PlanResult],
) -> None:
    problem, result = opt_result
    assert result.meets_bound and result.chosen is not None
    assert set(result.best_by_kind) == {k.value for k in ScheduleKind}
    for prediction in result.best_by_kind.values():
        assert is_meeting(prediction, problem.latency_bound_s)
    searched = [result.best_by_kind[k.value] for k in problem.kinds]
    assert result.chosen == max(searched, key=lambda p: p.throughput_seq_s)
    assert result.chosen.throughput_seq_s > result.best_by_kind["static"].throughput_seq_s
    assert result.search.num_evaluations > 0 and result.search.wall_s > 0
    assert result.search.num_baseline_evaluations > 0
    kinds_seen = {p.schedule.kind for p in result.evaluated}
    assert kinds_seen == set(ScheduleKind)


def test_branch_and_bound_evaluates_far_fewer_points_on_the_full_space(
    opt_result: tuple[PlanProblem, PlanResult],
) -> None:
    problem, fast = opt_result
    full = plan(problem, exhaustive=True)
    assert fast.chosen is not None and full.chosen is not None
    assert fast.chosen.throughput_seq_s * (1 + problem.throughput_tolerance) >= (
        full.chosen.throughput_seq_s
    )
    assert fast.search.num_evaluations * 5 < full.search.num_evaluations
    assert fast.search.wall_s < full.search.wall_s


def test_throughput_tolerance_is_slack_for_an_interior_peak() -> None:
    """A measured profile is monotonic only within a tolerance: here B_E = 18 encodes 7%
    faster than its neighbours, so throughput peaks inside the B_E axis, 3.7% above the best
    corner. With eps_T = 5% the search keeps the boxes around it and finds it (the paper's
    rule: prune only when bound x (1 + eps_T) <= incumbent); with no slack the corners hide it."""
    model = BumpyCostModel(
        decoder_only_shape(), tp_degrees=(1,), bump_tokens=18 * 10, bump_factor=0.93
    )
    problem = PlanProblem(model, toy_workload(), math.inf, 1, 10**9, kinds=(ScheduleKind.RRA,))
    space = SearchSpace(max_encode_batch_size=32)
    # RRA's best (the plan may choose a baseline over it; the search is the point here).
    full = plan(problem, exhaustive=True, space=space)
    assert full.best_by_kind["rra"].schedule.encode_batch_size == 18
    slack = plan(replace(problem, throughput_tolerance=0.05), space=space)
    assert slack.best_by_kind["rra"] == full.best_by_kind["rra"]
    assert slack.search.num_evaluations < full.search.num_evaluations
    strict = plan(replace(problem, throughput_tolerance=0.0), space=space)
    peak_seq_s = full.best_by_kind["rra"].throughput_seq_s
    assert strict.best_by_kind["rra"].throughput_seq_s < peak_seq_s / 1.03


def test_nothing_fitting_in_memory_says_what_the_smallest_needs() -> None:
    problem = replace(random_problem(5), device_memory_bytes=1000)
    result = plan(problem, space=SMALL_SPACE)
    assert result.chosen is None and result.lowest_latency is None
    assert "no configuration fits in memory" in result.infeasible_reason
    assert "GiB" in result.infeasible_reason


def test_search_is_deterministic(opt_result: tuple[PlanProblem, PlanResult]) -> None:
    problem, result = opt_result
    again = plan(problem)
    assert again.chosen == result.chosen
    assert again.search.num_evaluations == result.search.num_evaluations


def test_grid_axis() -> None:
    space = SearchSpace(dense_until=4, growth=1.5)
    assert space.axis(20) == (1, 2, 3, 4, 6, 9, 14, 20)
    assert space.axis(3) == (1, 2, 3)
    assert space.axis(1) == (1,)
    with pytest.raises(ValueError):
        SearchSpace(growth=1.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latency_bound_s": 0.0}, "latency bound must be positive"),
        ({"latency_bound_s": -1.0}, "latency bound must be positive"),
        ({"latency_bound_s": math.nan}, "latency bound must be positive"),
        ({"num_devices": 0}, "at least 1"),
        ({"device_memory_bytes": 0}, "memory must be positive"),
        ({"kinds": ()}, "non-empty subset"),
        ({"kinds": (ScheduleKind.STATIC,)}, "non-empty subset"),
        ({"num_devices": 1, "kinds": (ScheduleKind.WAA_C,)}, "at least 2 devices"),
        ({"throughput_tolerance": -0.01}, "non-negative"),
    ],
)
def test_problem_rejects_bad_input(changes: dict[str, object], message: str) -> None:
    problem = random_problem(1)
    with pytest.raises(ValueError, match=message):
        replace(problem, **changes)


def test_simulator_and_search_do_not_import_grpc() -> None:
    code = (
        "import sys; import services.scheduler.search.plan, services.scheduler.problem_builder; "
        "sys.exit(any(name.split('.')[0] == 'grpc' for name in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_latencies_a_rounding_apart_tie_and_the_higher_throughput_is_faster() -> None:
    # Two schedules' latencies, sums of the same steps in another order, one float step
    # apart (0.038 and 0.038000000000000006 on the toy problem): a tie, which throughput
    # breaks, whichever way the rounding fell.
    def point(kind: ScheduleKind, latency_s: float, seq_s: float) -> Prediction:
        schedule = Schedule(kind, encode_batch_size=1, decode_batch_size=1)
        return Prediction(schedule, True, seq_s, seq_s, latency_s, (0,), (0.0,))

    low, high = 0.038, math.nextafter(0.038, 1.0)
    for rra_latency, static_latency in ((low, high), (high, low)):
        rra = point(ScheduleKind.RRA, rra_latency, 26.3)
        static = point(ScheduleKind.STATIC, static_latency, 53.0)
        assert faster(static, rra) and not faster(rra, static)
    assert faster(point(ScheduleKind.RRA, 0.037, 1.0), point(ScheduleKind.STATIC, 0.038, 9.0))


def test_throughputs_a_rounding_apart_tie_and_the_lower_latency_is_better() -> None:
    def point(latency_s: float, seq_s: float) -> Prediction:
        schedule = Schedule(ScheduleKind.RRA, encode_batch_size=1, decode_batch_size=1)
        return Prediction(schedule, True, seq_s, seq_s, latency_s, (0,), (0.0,))

    low, high = 26.3, math.nextafter(26.3, 100.0)
    for slow_seq_s, fast_seq_s in ((low, high), (high, low)):
        assert better(point(1.0, fast_seq_s), point(2.0, slow_seq_s))
        assert not better(point(2.0, slow_seq_s), point(1.0, fast_seq_s))
    assert better(point(2.0, 27.0), point(1.0, 26.3))
