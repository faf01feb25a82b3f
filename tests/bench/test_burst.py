"""exegpt/bench/burst.py: one rule sizes a measured burst for the benchmarks and the demo, in
running batches of every worker replica and seconds at the predicted rate, and one rule sizes a
calibration pass, also in decode steps on every replica; hand-computed sizes on hand-made
plans."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from exegpt.bench.burst import (
    calibration_pass_size,
    measured_burst,
    plan_calibration_pass,
    running_sequences,
)
from exegpt.commands import autoplan, demo
from exegpt.plan_file import PlanFile
from exegpt.schedule import Schedule, ScheduleKind


def _report(
    kind: ScheduleKind, b_d: int, replicas: int, seq_s: float, mean_output: float | None
) -> dict[str, object]:
    schedule = Schedule(kind, 8, b_d, num_replicas=replicas)
    return {
        "schedule": schedule.to_dict(),
        "predicted": {"throughput_seq_s": seq_s},
        "mean_output_tokens": mean_output,
    }


def _plan(kind: ScheduleKind, b_d: int, replicas: int, mean_output: float | None = 8.0) -> PlanFile:
    return PlanFile.from_dict(_report(kind, b_d, replicas, 1.0, mean_output))


def _auto(
    kind: ScheduleKind, b_d: int, replicas: int, seq_s: float, mean_output: float | None = 8.0
) -> autoplan.AutoPlan:
    report = _report(kind, b_d, replicas, seq_s, mean_output)
    return autoplan.AutoPlan(report, Path("plan.json"), PlanFile.from_dict(report), 1.0)


def test_running_sequences_count_every_worker_replica() -> None:
    rra = _plan(ScheduleKind.RRA, 300, 2)
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


def test_a_calibration_pass_is_the_most_of_batches_seconds_and_decode_steps() -> None:
    # Task S at a quarter of its lengths (8 output tokens on average, the first from the
    # prefill: 7 decode rows a request), continuous at batch 16, 64 seq/s predicted:
    # 5 s x 64 = 320 beats 2 x 16 = 32 and 64 steps x 16 rows / 7 = 146.3.
    assert calibration_pass_size(16, 64.0, 8.0) == 320
    # Slow steps (10 seq/s at batch 32): 5 s hold 50 requests, 64 decode steps of 32 rows
    # need 64 x 32 / 7 = 292.6 requests, beating 2 x 32 = 64.
    assert calibration_pass_size(32, 10.0, 8.0) == 293
    # Long outputs and a big batch on 2 replicas (600 running): 2 x 600 beats 5 s x 10 = 50
    # and 64 x 600 / 99 = 387.9.
    assert calibration_pass_size(600, 10.0, 100.0) == 1200
    # Seconds and steps are rounded up: 5 s x 64.1 seq/s = 320.5; 64 x 16 / 6 = 170.7.
    assert calibration_pass_size(16, 64.1, 8.0) == 321
    assert calibration_pass_size(16, 10.0, 7.0) == 171
    # One output token decodes nothing: no step term (64 x 16 / 0), the batches' 32.
    assert calibration_pass_size(16, 1.0, 1.0) == 32


def test_a_calibration_pass_is_clamped_and_takes_a_steady_time_and_cap() -> None:
    assert calibration_pass_size(4, 1.0, 100.0) == 32  # 8, 5, 3: at least 32
    assert calibration_pass_size(5000, 1.0, 100.0) == 2000  # 2 x 5000: at most 2000
    # A static plan of B_D 807 on 2 replicas at 8 output tokens: 64 x 1614 / 7 = 14757 capped.
    assert calibration_pass_size(1614, 200.0, 8.0) == 2000
    assert calibration_pass_size(1614, 200.0, 8.0, max_requests=4000) == 4000
    assert calibration_pass_size(1, 0.0, 1000.0) == 32  # no rate predicted: the floor
    # The demo's: 3 s x 190 = 570 and 2 x 264 = 528 are under 64 x 264 / 7 = 2414: capped.
    assert calibration_pass_size(264, 190.0, 8.0, steady_s=3.0, max_requests=500) == 500
    assert calibration_pass_size(16, 64.0, 8.0, steady_s=1.0) == 147  # the steps then


@pytest.mark.parametrize(
    ("running", "seq_s", "mean_output", "cap"),
    [
        (0, 1.0, 8.0, 4000),
        (8, -1.0, 8.0, 4000),
        (8, float("nan"), 8.0, 4000),
        (8, float("inf"), 8.0, 4000),
        (8, 1.0, 0.0, 4000),
        (8, 1.0, float("nan"), 4000),
        (8, 1.0, float("inf"), 4000),
        (8, 1.0, 8.0, 31),
    ],
)
def test_a_calibration_pass_of_nothing_is_refused(
    running: int, seq_s: float, mean_output: float, cap: int
) -> None:
    with pytest.raises(ValueError, match="a calibration pass needs"):
        calibration_pass_size(running, seq_s, mean_output, max_requests=cap)


def test_a_plan_s_calibration_pass_counts_every_replica_and_copy() -> None:
    # Continuous B_D 16 on 1 replica at 64 seq/s, 8 output tokens: 320 as above.
    assert plan_calibration_pass(_plan(ScheduleKind.CONTINUOUS, 16, 1), 64.0) == 320
    # RRA B_D 300 on 2 replicas, 50 seq/s, 100 output tokens: 2 x 600 = 1200 beats 250, 388;
    # two copies of the plan: 2 x 1200 = 2400, capped at 2000.
    rra = _plan(ScheduleKind.RRA, 300, 2, mean_output=100.0)
    assert plan_calibration_pass(rra, 50.0) == 1200
    assert plan_calibration_pass(rra, 50.0, copies=2) == 2000
    assert plan_calibration_pass(rra, 50.0, copies=2, max_requests=4000) == 2400
    # Two copies of a fast small plan run at twice its rate: 5 s x 2 x 64 = 640.
    small = _plan(ScheduleKind.CONTINUOUS, 16, 1)
    assert plan_calibration_pass(small, 64.0, copies=2) == 640
    with pytest.raises(ValueError, match="a calibration pass needs"):  # no mean output known
        plan_calibration_pass(_plan(ScheduleKind.CONTINUOUS, 16, 1, mean_output=None), 64.0)


def test_the_demo_sizes_its_calibration_pass_by_the_rule_with_its_own_time_and_cap() -> None:
    default = argparse.Namespace(burst=None, replicas=1)
    # B_D 132 on 2 replicas at 190 seq/s: 64 x 264 / 7 = 2414, capped at half the demo's
    # burst of 1000 (4 x 264 = 1056 capped).
    assert demo._calibration_size(_auto(ScheduleKind.STATIC, 132, 2, 190.0), default) == 500
    # A small plan: 3 s x 20 = 60, 2 x 8 = 16, 64 x 8 / 7 = 74, capped at half its burst of
    # 64 requests: 32, never more than the demo sent before the rule.
    assert demo._calibration_size(_auto(ScheduleKind.STATIC, 8, 1, 20.0), default) == 32
    # A fast plan: the rule asks 3 s x 300 = 900 (beating 2 x 16 = 32 and 64 x 16 / 7 = 147),
    # capped at half its burst (also 3 s x 300 = 900): 450.
    assert demo._calibration_size(_auto(ScheduleKind.STATIC, 16, 1, 300.0), default) == 450
    # --burst N: half as many, at least 32.
    small = _auto(ScheduleKind.STATIC, 8, 1, 20.0)
    assert demo._calibration_size(small, argparse.Namespace(burst=16, replicas=1)) == 32
    assert demo._calibration_size(small, argparse.Namespace(burst=200, replicas=1)) == 100
