"""benchmarks/schedule_runs.py sizes every burst in running batches for all the worker
replicas of a plan (B_D is one replica's batch), so that a measured burst reaches a steady
state; hand-computed sizes on hand-made plans."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from exegpt.commands import autoplan
from exegpt.schedule import Schedule, ScheduleKind

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as the benchmark scripts put their folder first
RUNS = runpy.run_path(str(BENCHMARKS / "schedule_runs.py"), run_name="schedule_runs")


def _auto(kind: ScheduleKind, b_e: int, b_d: int, replicas: int, seq_s: float) -> object:
    schedule = Schedule(kind, b_e, b_d, num_replicas=replicas)
    report = {"schedule": schedule.to_dict(), "predicted": {"throughput_seq_s": seq_s}}
    plan = autoplan.PlanFile.from_dict(report)
    return autoplan.AutoPlan(report, Path("plan.json"), plan, 1.0)


def _args(num_requests: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(num_requests=num_requests)


def test_a_measured_burst_holds_four_running_batches_per_worker_replica() -> None:
    # RRA at B_D = 300 on each of 2 replicas: 4 x 600 = 2400 requests (the old rule, 4 x B_D
    # capped at 1000, gave each replica 500: not even two batches, never steady).
    rra = _auto(ScheduleKind.RRA, 290, 300, 2, seq_s=50.0)
    assert RUNS["running_batches"](rra) == 600
    assert RUNS["requests_for"](_args(), rra) == 2400
    # A fast small plan: 15 s at 80 seq/s (1200) outweighs 4 x 2 x 20 = 160.
    small = _auto(ScheduleKind.CONTINUOUS, 3, 20, 2, seq_s=80.0)
    assert RUNS["requests_for"](_args(), small) == 1200
    # Never fewer than 64, never more than 4000; --num-requests overrides.
    assert RUNS["burst_size"](_args(), 4, 1.0) == 64
    assert RUNS["burst_size"](_args(), 5000, 1.0) == 4000
    assert RUNS["requests_for"](_args(77), rra) == 77


def test_warm_up_bursts_are_sized_from_the_running_batches() -> None:
    # (Calibration passes follow exegpt/bench/burst.py's rule: tests/bench/test_burst.py.)
    assert RUNS["warmup_requests"](600) == 150  # a quarter
    assert RUNS["warmup_requests"](4) == 16
