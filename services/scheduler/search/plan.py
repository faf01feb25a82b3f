"""XScheduler: the highest-throughput schedule whose p99 latency meets the bound.

`plan(problem)` searches every kind in `problem.kinds` separately and keeps the best, then runs
the two baselines (static and continuous batching, a 1-D batch-size search each) so the answer
can be compared with what users run today. The chosen schedule is the best predicted of any
kind within the bound, the baselines included: a plan never recommends a schedule it predicts
to do worse than a baseline it reports.

Data-parallel replicas are a dimension of every kind, baselines included: R divides the N
devices and each replica runs the schedule on N / R devices (throughput x R, one replica's
latency and per-device memory; simulator/predict.py). Each R is its own set of sub-spaces
(WAA needs N / R >= 2), so a small model served by independent replicas, with no hand-offs,
competes with one replica spread over all N devices. `problem.replicas` limits R (the
scheduler service's re-plans keep the R of the deployment their replicas form).

The space (the same for branch-and-bound and for `exhaustive=True`):
- per kind, one sub-space per TP degree t (every degree of the profile up to the devices
  available, plus no TP) and, for WAA, per candidate encode/decode split (simulator/waa.py);
- RRA axes: B_E, N_D, number of TP groups (0..N/t); WAA axes: B_E, B_m (1..8), number of TP
  groups on the decode side;
- B_E and N_D take every integer up to `dense_until` (16), then steps of about 10% (`growth`)
  up to their maximum (B_E: the largest that fits in memory at the most favourable corner of
  the other axes, at most `max_encode_batch_size`; N_D: the maximum output length). Beyond 16
  a 10% step changes throughput and latency by a few percent, well inside the tolerances, and
  keeps the exhaustive mode affordable.
- Small axes are enumerated, each value a slice of its own, instead of bisected: the number of
  TP groups (at most N/t + 1 values) and, for WAA, B_m. B_m is not monotonic in this model
  (more micro-batches fill the decode pipeline but shrink each kernel's batch, so latency and
  throughput are U-shaped in it; the paper also found B_m the least monotonic variable).
  Branch-and-bound then bisects (B_E, N_D) for RRA and B_E for WAA, with one incumbent per
  kind shared by all its slices, so most slices are dropped at their root box.

Monotonic branch-and-bound (docs/design.md section 3.3; the paper's Algorithm 1): boxes of index
ranges wait in a priority queue keyed by an upper bound on their throughput; the simulator
runs at a box's corners (memoised, so shared corners cost once). Throughput, latency and
memory are taken to be monotonic along each axis, in either direction, so over a box they are
extreme at corners: the best corner bounds the box's throughput, the lowest corner latency and
memory bound its latency and memory. The tolerances are slack for the functions being only
nearly monotonic (the paper measured 96-97% monotonic points at 5%), as in its Algorithm 1:
a box is dropped when its throughput bound x (1 + eps_T) is still at most the incumbent's
throughput, when its lowest latency exceeds L_B + eps_L, or when its lowest memory does not
fit; otherwise its longest axis is halved. So an interior point that beats the box's corners
by up to eps_T is still found (a measured profile's throughput over B_E can peak inside a
box), at the price of exploring near-flat regions further. Every corner that is feasible and
within L_B is a candidate. When nothing meets L_B, a second branch-and-bound minimises
latency over the feasible points (at equal latency, the higher throughput), the baselines'
points beside them, and the answer reports it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace

from exegpt.schedule import ScheduleKind
from services.scheduler.problem import PlanProblem, PlanResult, Prediction, SearchStats
from services.scheduler.search.branch_and_bound import maximise
from services.scheduler.search.space import (
    Evaluator,
    SearchSpace,
    SubSpace,
    better,
    faster,
    fits_memory,
    replica_counts,
    sub_spaces,
)
from services.scheduler.simulator import baselines, continuous
from services.scheduler.simulator.common import GIB
from services.scheduler.simulator.predict import Simulator, is_meeting

__all__ = ["SearchSpace", "best_baseline", "plan", "static_latency_bounds"]

logger = logging.getLogger(__name__)


def _best_of_kind(
    subs: list[SubSpace], evaluate: Evaluator, problem: PlanProblem, exhaustive: bool
) -> Prediction | None:
    bound_s = problem.planning_bound_s
    best: Prediction | None = None
    for sub in subs:
        if exhaustive:
            for index in sub.points():
                prediction = evaluate(sub.schedule(index))
                if is_meeting(prediction, bound_s) and better(prediction, best):
                    best = prediction
            continue
        best = maximise(
            sub,
            evaluate,
            problem,
            lambda p: p.throughput_seq_s,
            lambda p: is_meeting(p, bound_s),
            best,
            lambda value: problem.throughput_tolerance * value,
        )
    return best


def _lowest_latency(
    subs: list[SubSpace], evaluate: Evaluator, problem: PlanProblem, exhaustive: bool
) -> Prediction | None:
    unbounded = replace(problem, latency_bound_s=math.inf)
    best: Prediction | None = None
    for sub in subs:
        if exhaustive:
            for index in sub.points():
                prediction = evaluate(sub.schedule(index))
                if prediction.feasible and faster(prediction, best):
                    best = prediction
            continue
        best = maximise(
            sub,
            evaluate,
            unbounded,
            lambda p: -p.latency_s,
            lambda p: p.feasible,
            best,
            lambda _value: problem.latency_tolerance_s,
        )
    return best


def _baseline_points(
    problem: PlanProblem,
    simulator: Simulator,
    evaluate: Evaluator,
    kind: ScheduleKind,
    space: SearchSpace,
    replicas: tuple[int, ...] | None = None,
) -> Iterator[Prediction]:
    """Every replica count R (default: the problem's), layout on N / R devices (TP degree
    dividing it) and batch size, up to the first that does not fit (memory grows with the
    batch)."""
    costs = simulator.costs
    for count in replicas or replica_counts(problem.num_devices, allowed=problem.replicas):
        num_devices = problem.num_devices // count
        for tp in baselines.layout_options(costs, num_devices):
            num_stages = num_devices // tp
            for batch in space.axis(
                space.max_running_batch_size, num_stages if kind == ScheduleKind.CONTINUOUS else 1
            ):
                if kind == ScheduleKind.STATIC:
                    schedule = baselines.static_schedule(batch, tp, num_devices)
                else:
                    schedule = continuous.continuous_schedule(costs, batch, tp, num_devices)
                prediction = evaluate(replace(schedule, num_replicas=count))
                if not fits_memory(prediction, problem.device_memory_bytes):
                    break
                yield prediction


def best_baseline(
    problem: PlanProblem,
    simulator: Simulator,
    evaluate: Evaluator,
    kind: ScheduleKind,
    space: SearchSpace,
    replicas: tuple[int, ...] | None = None,
) -> Prediction | None:
    """The baseline's best configuration within the bound (1-D search per replica count and
    layout; `replicas` limits the replica counts, default the problem's)."""
    best: Prediction | None = None
    for prediction in _baseline_points(problem, simulator, evaluate, kind, space, replicas):
        if is_meeting(prediction, problem.planning_bound_s) and better(prediction, best):
            best = prediction
    return best


def static_latency_bounds(
    problem: PlanProblem, quantiles: tuple[float, ...], space: SearchSpace | None = None
) -> list[float]:
    """Latency bounds derived as in the paper (docs/design.md section 4): the given quantiles of the
    static baseline's latencies over its batch sizes (every batch that fits, in the layout
    with the highest unbounded throughput)."""
    space = space or SearchSpace()
    unbounded = replace(problem, latency_bound_s=math.inf)
    simulator = Simulator(unbounded)
    evaluate = Evaluator(simulator)
    # On the N devices as one replica, as the paper runs it (its bounds do not move with R).
    best = best_baseline(unbounded, simulator, evaluate, ScheduleKind.STATIC, space, (1,))
    if best is None:
        raise ValueError("the static baseline does not fit on these devices at batch size 1")
    latencies = []
    for batch in range(1, space.max_running_batch_size + 1):
        schedule = baselines.static_schedule(batch, best.schedule.tp_degree, problem.num_devices)
        prediction = evaluate(schedule)
        if not prediction.feasible:
            break
        latencies.append(prediction.latency_s)
    ordered = sorted(latencies)
    return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in quantiles]


def plan(
    problem: PlanProblem, *, exhaustive: bool = False, space: SearchSpace | None = None
) -> PlanResult:
    """Search `problem.kinds` (branch-and-bound, or every point with `exhaustive`), keep the
    best within the bound, and report both baselines' best configurations too."""
    space = space or SearchSpace()
    simulator = Simulator(problem)
    evaluate = Evaluator(simulator)
    start_s = time.perf_counter()
    best_by_kind: dict[str, Prediction] = {}
    all_subs: list[SubSpace] = []
    for kind in problem.kinds:
        subs = sub_spaces(problem, kind, simulator, space, evaluate)
        all_subs.extend(subs)
        best = _best_of_kind(subs, evaluate, problem, exhaustive)
        if best is not None:
            best_by_kind[kind.value] = best
        logger.debug("%s: %d evaluations so far", kind.value, evaluate.num_evaluations)
    search_wall_s = time.perf_counter() - start_s
    baseline_evaluate = Evaluator(simulator)
    baseline_start_s = time.perf_counter()
    for kind in (ScheduleKind.STATIC, ScheduleKind.CONTINUOUS):
        best = best_baseline(problem, simulator, baseline_evaluate, kind, space)
        if best is not None:
            best_by_kind[kind.value] = best
    baseline_wall_s = time.perf_counter() - baseline_start_s
    # The honest answer is the best predicted schedule of any kind, the baselines included:
    # never one predicted to do worse than a baseline the report prints beside it.
    chosen = None
    for prediction in best_by_kind.values():
        if better(prediction, chosen):
            chosen = prediction
    start_s = time.perf_counter()
    lowest = None if chosen else _lowest_latency(all_subs, evaluate, problem, exhaustive)
    for kind in () if chosen else (ScheduleKind.STATIC, ScheduleKind.CONTINUOUS):
        for point in _baseline_points(problem, simulator, baseline_evaluate, kind, space):
            if point.feasible and faster(point, lowest):
                lowest = point  # a baseline as fast serves more at that latency, or sooner
    if lowest is not None and is_meeting(lowest, problem.latency_bound_s):
        # Nothing meets the planned bound, but the user's bound is met inside the headroom:
        # the schedule with the most margin left serves, rather than none.
        chosen, lowest = lowest, None
    search = SearchStats(
        evaluate.num_evaluations,
        search_wall_s + time.perf_counter() - start_s,
        num_baseline_evaluations=baseline_evaluate.num_evaluations,
        baseline_wall_s=baseline_wall_s,
    )
    evaluated = list(evaluate.evaluated.values()) + list(baseline_evaluate.evaluated.values())
    infeasible_reason = ""
    if chosen is None and lowest is None:
        infeasible_reason = _memory_shortfall(list(evaluate.evaluated.values()), problem)
    return PlanResult(
        chosen=chosen,
        meets_bound=chosen is not None,
        best_by_kind=best_by_kind,
        lowest_latency=lowest,
        search=search,
        evaluated=evaluated,
        infeasible_reason=infeasible_reason,
    )


def _memory_shortfall(evaluated: list[Prediction], problem: PlanProblem) -> str:
    """Why nothing is feasible: the configuration needing the least memory, and how much."""
    if not evaluated:
        return "no configuration of the requested kinds exists on these devices"
    smallest = min(evaluated, key=lambda p: max(p.memory_bytes_per_device))
    need_gib = max(smallest.memory_bytes_per_device) / GIB
    have_gib = problem.device_memory_bytes / GIB
    return (
        f"no configuration fits in memory: the smallest ({smallest.schedule.describe()}) needs "
        f"{need_gib:.3f} GiB on one device, {have_gib:.3f} GiB available; add devices, memory, "
        "or a profile with a higher TP degree"
    )
