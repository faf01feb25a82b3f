"""exegpt/bench/burst.py: one rule sizes a measured burst for the benchmarks and the demo, in
running batches of every worker replica and seconds at the predicted rate; hand-computed sizes
on hand-made plans."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from exegpt import autoplan, demo
from exegpt.bench.burst import measured_burst, running_sequences
from exegpt.schedule import Schedule, ScheduleKind


def _auto(kind: ScheduleKind, b_d: int, replicas: int, seq_s: float) -> autoplan.AutoPlan:
    schedule = Schedule(kind, 8, b_d, num_replicas=replicas)
    report = {"schedule": schedule.to_dict(), "predicted": {"throughput_seq_s": seq_s}}
    return autoplan.AutoPlan(report, Path("plan.json"), autoplan.PlanFile.from_dict(report), 1.0)


def test_running_sequences_count_every_worker_replica() -> None:
    rra = _auto(ScheduleKind.RRA, 300, 2, 10.0)
    assert running_sequences(rra) == 600  # B_D 300 x R 2
    assert running_sequences(rra, copies=2) == 1200  # two copies of the plan


def test_the_rule_takes_the_most_of_batches_and_steady_time_within_its_bounds() -> None:
    assert measured_burst(600, 10.0) == 2400  # 4 x 600 > 15 s x 10 seq/s = 150
    assert measured_burst(100, 200.0) == 3000  # 15 s x 200 seq/s > 4 x 100 = 400
    assert measured_burst(4, 1.0) == 64  # at least 64
    assert measured_burst(5000, 1.0) == 4000  # at most 4000
    # A demo's steady time and cap: 3 s x 122 seq/s = 366 > 4 x 84 = 336; 4 x 300 over 1000.
    assert measured_burst(84, 122.0, steady_s=3.0, max_requests=1000) == 366
    assert measured_burst(300, 100.0, steady_s=3.0, max_requests=1000) == 1000


@pytest.mark.parametrize(
    ("running", "seq_s", "cap"),
    [(0, 1.0, 4000), (8, -1.0, 4000), (8, float("nan"), 4000), (8, 1.0, 10)],
)
def test_a_burst_of_nothing_is_refused(running: int, seq_s: float, cap: int) -> None:
    with pytest.raises(ValueError, match="a burst needs"):
        measured_burst(running, seq_s, max_requests=cap)


def test_the_demo_sizes_its_burst_by_the_rule_with_its_own_steady_time_and_cap() -> None:
    auto = _auto(ScheduleKind.WAA_C, 84, 1, 122.0)
    assert demo._burst_size(auto, argparse.Namespace(burst=None, replicas=1)) == 366
    # Two copies of the plan: 4 x 168 = 672 running-batch requests beat 3 s x 122 = 366.
    assert demo._burst_size(auto, argparse.Namespace(burst=None, replicas=2)) == 672
    big = _auto(ScheduleKind.RRA, 600, 2, 100.0)  # 4 x 1200 capped at the demo's 1000
    assert demo._burst_size(big, argparse.Namespace(burst=None, replicas=1)) == 1000
    assert demo._burst_size(big, argparse.Namespace(burst=16, replicas=1)) == 16
