"""benchmarks/schedules.py holds its baselines to the planned schedule's bound: the continuous
data-parallel baseline is sized from the (calibrated) plan's profile at R = the device count,
each baseline is judged against the bound, and "vs best" divides by the best that met it."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

from exegpt.bench.against_plan import Comparison, Measured
from exegpt.commands import autoplan
from exegpt.commands.calibration_pass import DeployedPrediction
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.calibration import Calibration
from services.scheduler.observations import StageKind

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "schedules.py"
SCHEDULES = runpy.run_path(str(SCRIPT), run_name="schedules")
Baseline = SCHEDULES["Baseline"]
size_dp = SCHEDULES["size_dp"]
best_met = SCHEDULES["best_met"]


def _entry(kind: ScheduleKind, batch: int, replicas: int, latency_s: float = 1.0) -> dict:
    """A `best_by_kind` entry as a plan report holds it."""
    schedule = Schedule(kind, batch, batch, num_replicas=replicas)
    return {"schedule": schedule.to_dict(), "describe": schedule.describe(),
            "throughput_seq_s": 10.0, "latency_s": latency_s}  # fmt: skip


def _measured(seq_s: float, latency_s: float, num_failed: int = 0) -> Measured:
    return Measured(
        seq_s, latency_s, num_ok=100 - num_failed, num_failed=num_failed,
        burst_throughput_seq_s=seq_s,
    )  # fmt: skip


def test_dp_is_sized_from_the_configuration_at_r_equal_devices() -> None:
    first = {
        "num_devices": 2,
        "best_by_kind": {"continuous": _entry(ScheduleKind.CONTINUOUS, 40, 1)},
    }
    sizing = size_dp(_entry(ScheduleKind.CONTINUOUS, 12, 2), first, "calibrated")
    assert sizing.running_batch == 24 and not sizing.fallback
    assert sizing.source.startswith("calibrated: continuous")
    assert sizing.source.endswith("(predicted 10.00 seq/s, 1.00 s)")


def test_dp_falls_back_to_the_first_plans_sizing_and_says_so() -> None:
    first = {
        "num_devices": 2,
        "best_by_kind": {"continuous": _entry(ScheduleKind.CONTINUOUS, 40, 1)},
    }
    sizing = size_dp(None, first, "calibrated")
    assert sizing.running_batch == 40 and sizing.fallback
    assert "FALLBACK: no continuous configuration meets the bound calibrated" in sizing.source
    bare = size_dp(None, {"num_devices": 2, "best_by_kind": {}}, "uncalibrated")
    assert bare.running_batch == 64 and bare.fallback and "32 per device" in bare.source


def test_a_baseline_meets_the_bound_by_its_measured_latency() -> None:
    assert Baseline("static", _measured(5.0, 1.9), 2.0).meets_bound is True
    assert Baseline("static", _measured(5.0, 2.1), 2.0).meets_bound is False
    assert Baseline("static", _measured(5.0, math.nan), 2.0).meets_bound is False
    assert Baseline("static", None, 2.0).meets_bound is None
    assert Baseline("static", _measured(5.0, 9.0), math.inf).meets_bound is None


def test_best_baseline_is_the_fastest_that_met_the_bound() -> None:
    fast_but_late = Baseline("continuous-DP", _measured(9.0, 2.5), 2.0)
    slow_in_time = Baseline("static", _measured(4.0, 1.5), 2.0)
    faster_in_time = Baseline("continuous-DP", _measured(6.0, 1.8), 2.0)
    assert best_met([fast_but_late, slow_in_time]) is slow_in_time
    assert best_met([slow_in_time, faster_in_time]) is faster_in_time
    assert best_met([fast_but_late, Baseline("static", None, 2.0)]) is None


def _row(static: object, dp: object, during: object = None, failed: int = 0) -> object:
    first = SCHEDULES["FirstChoice"]({"describe": "x", "throughput_seq_s": 1.0,
                                      "latency_s": 1.0}, None, "kept")  # fmt: skip
    planned = Comparison(8.0, 8.0, 1.8, 1.8, 2.0)
    sizing = SCHEDULES["DpSizing"](24, "calibrated: continuous", False)
    chosen = {"throughput_seq_s": 7.0, "latency_s": 1.9}
    return SCHEDULES["Row"](
        "S", 2.0, "rra", "rra", planned, first, "cal", static, dp, sizing, chosen, during,
        _measured(8.0, 1.8, failed),
    )  # fmt: skip


def test_table_prints_each_baselines_bound_and_the_ratio_to_the_best_that_met_it() -> None:
    static = Baseline("static", _measured(4.0, 1.5), 2.0)
    late = Baseline("continuous-DP", _measured(16.0, 2.5), 2.0)
    table = SCHEDULES["format_rows"]([_row(static, late)])
    header, line = table.splitlines()[:2]
    assert header.split()[-13:] == [
        "fail", "static", "met", "fail", "cont-DP", "met", "fail", "vs", "static", "vs", "DP",
        "vs", "best",
    ]  # fmt: skip
    # static met (4.00 yes), DP did not (16.00 no); vs static 2.00, vs DP 0.50, vs best 2.00
    assert line.split()[-10:] == [
        "0", "4.00", "yes", "0", "16.00", "no", "0", "2.00", "0.50", "2.00"
    ]  # fmt: skip
    assert "INVALID" not in table
    assert "continuous DP baseline: calibrated: continuous" in table
    assert "when chosen it was predicted 7.00 seq/s, 1.90 s" in table
    assert "steps as the measured burst ran them" not in table  # only with a pass
    during = DeployedPrediction(
        {"throughput_seq_s": 10.0, "latency_s": 1.5},
        Calibration({StageKind.DECODE: 2.0}, {StageKind.DECODE: 40}),
    )
    diagnosed = SCHEDULES["format_rows"]([_row(static, late, during)])
    # measured 8.0 seq/s and 1.8 s against 10.0 and 1.5: -20% and +20%
    assert (
        "steps as the measured burst ran them (calibrated from 40 observations (decode x2.00 "
        "from 40)): predicted 10.00 seq/s (-20%), 1.50 s (+20%)"
    ) in diagnosed
    none_met = SCHEDULES["format_rows"]([_row(Baseline("static", None, 2.0), late)])
    assert none_met.splitlines()[1].split()[-10:] == [
        "0", "-", "-", "-", "16.00", "no", "0", "-", "0.50", "-"
    ]  # fmt: skip


def test_a_burst_with_over_one_percent_failed_is_marked_invalid_and_judged_on_nothing() -> None:
    static = Baseline("static", _measured(4.0, 1.5, num_failed=2), 2.0)  # 2% failed
    dp = Baseline("continuous-DP", _measured(6.0, 1.5, num_failed=1), 2.0)  # 1%: still valid
    assert static.meets_bound is False
    assert best_met([static, dp]) is dp
    line = SCHEDULES["format_rows"]([_row(static, dp)]).splitlines()[1]
    # static: 2 failed, invalid, no ratio; DP 1 failed, met, ratios 8/6
    assert line.split()[-10:] == ["0", "4.00", "no", "2!", "6.00", "yes", "1", "-", "1.33", "1.33"]
    bad_plan = SCHEDULES["format_rows"]([_row(static, dp, failed=5)])
    assert bad_plan.splitlines()[1].split()[-11:-6] == ["no", "5!", "4.00", "no", "2!"]
    assert bad_plan.splitlines()[1].split()[-3:] == ["-", "-", "-"]
    assert "! more than 1% of that burst's requests failed: its measurement is INVALID" in bad_plan
    document = SCHEDULES["row_json"](_row(static, dp, failed=5))
    assert document["failed"]["planned"] == {"num_failed": 5, "num_ok": 95, "valid": False}
    assert document["failed"]["continuous_dp"]["valid"] is True
    assert document["meets_bound"] is False and document["vs_best_baseline"] is None


def test_continuous_at_devices_searches_r_equal_devices_within_the_bound(
    measured_tiny_profile: Path, tmp_path: Path
) -> None:
    continuous_at_devices = SCHEDULES["continuous_at_devices"]
    request = autoplan.PlanRequest(
        workload="task:S", latency_bound="auto", num_devices=2, length_scale=0.25,
        profile=measured_tiny_profile,
    )  # fmt: skip
    auto = autoplan.make_plan(request, measured_tiny_profile, tmp_path)
    # Without the report's own continuous entry, the planner's baseline search at R = 2 runs.
    report = {**auto.report, "best_by_kind": {}}
    found = continuous_at_devices(report, request, measured_tiny_profile, auto.bound_s)
    schedule = Schedule.from_dict(found["schedule"])
    assert schedule.kind is ScheduleKind.CONTINUOUS and schedule.num_replicas == 2
    assert found["latency_s"] <= auto.bound_s
    # The report's own entry is taken as it is when it is already at R = 2.
    own = _entry(ScheduleKind.CONTINUOUS, 7, 2)
    report = {**auto.report, "best_by_kind": {"continuous": own}}
    assert continuous_at_devices(report, request, measured_tiny_profile, auto.bound_s) is own
    # No configuration meets a bound below any latency.
    assert continuous_at_devices({**auto.report, "best_by_kind": {}}, request,
                                 measured_tiny_profile, 1e-6) is None  # fmt: skip


def test_the_calibration_pass_is_sized_for_the_continuous_dp_deployment_it_runs_on() -> None:
    first_plan_pass = SCHEDULES["first_plan_pass"]
    first_plan_sizing = SCHEDULES["first_plan_sizing"]
    # The first plan is static B_D 807 x 2 at 200 seq/s; its best continuous configuration is
    # B_D 64 x 2 at 10 seq/s (`_entry`), the deployment the pass runs on.
    static = Schedule(ScheduleKind.STATIC, 807, 807, num_replicas=2)
    report = {
        "schedule": static.to_dict(),
        "predicted": {"throughput_seq_s": 200.0},
        "mean_output_tokens": 8.0,
        "num_devices": 2,
        "best_by_kind": {ScheduleKind.CONTINUOUS.value: _entry(ScheduleKind.CONTINUOUS, 64, 2)},
    }
    first = autoplan.AutoPlan(report, Path("plan.json"), autoplan.PlanFile.from_dict(report), 1.0)
    sizing = first_plan_sizing(report)
    assert sizing.running_batch == 128
    # 2 x 128 = 256, 5 s x 10 = 50, 64 steps x 128 rows / 7 decode rows a request = 1171 (the
    # first plan's own 1614 rows at 200 seq/s would ask for the 2000 cap).
    assert first_plan_pass(first, sizing) == 1171
