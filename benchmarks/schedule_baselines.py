"""The baselines of benchmarks/schedules.py, held to the same bound as the planned schedule.

Continuous batching on data-parallel replicas (one per device) is sized from the deployed
plan's profile (the calibrated copy after a calibration pass): its best continuous
configuration at R = the device count that meets the bound. When none meets it there, the
sizing falls back to the first (uncalibrated) plan's continuous configuration and says so.
Each baseline is measured in its own deployment and judged against the bound as the
planned schedule is; "vs best baseline" compares with the best measured baseline that met it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exegpt.bench import against_plan
from exegpt.bench.burst import calibration_pass_size
from exegpt.commands import autoplan
from exegpt.launcher import DeploymentConfig
from exegpt.schedule import Schedule, ScheduleKind
from exegpt.topology import Topology

CONTINUOUS = ScheduleKind.CONTINUOUS.value
UNSIZED_BATCH = 32  # per replica, when no continuous configuration is known at all
# Every request of a burst waits in the replica's queue rather than being refused.
WORKER_ARGS = ("--max-queue-size", "4096")
# A measured burst with more of its requests failed than this is no measurement.
MAX_FAILED_FRACTION = 0.01


def valid(measured: against_plan.Measured | None) -> bool:
    """Whether at most MAX_FAILED_FRACTION of the measured burst failed (None: not run)."""
    if measured is None:
        return True
    total = measured.num_ok + measured.num_failed
    return total > 0 and measured.num_failed <= MAX_FAILED_FRACTION * total


def failed_cell(measured: against_plan.Measured | None) -> str:
    """The failed requests of a measured burst, "!" after it when too many failed."""
    if measured is None:
        return "-"
    return f"{measured.num_failed}{'' if valid(measured) else '!'}"


@dataclass(frozen=True)
class DpSizing:
    """How large the continuous data-parallel baseline's running batch is, and why."""

    running_batch: int  # over all replicas (B_D x R)
    source: str  # the configuration it comes from
    fallback: bool  # True: no continuous configuration met the bound on the plan's profile


@dataclass(frozen=True)
class Baseline:
    """One baseline's measured burst, judged against the row's bound."""

    name: str
    measured: against_plan.Measured | None  # None: not run (no configuration of it fits)
    bound_s: float

    @property
    def meets_bound(self) -> bool | None:
        """Its measured p99-length latency within the bound (None: not run or no bound)."""
        if self.measured is None or math.isinf(self.bound_s):
            return None
        if not valid(self.measured):
            return False  # too many failures: the latency of the rest says nothing
        return self.measured.p99_length_latency_s <= self.bound_s  # nan: False


def running_batch(best: dict | None) -> int | None:
    """B_D x R of a report's prediction entry (`best_by_kind` shape); None without one."""
    if not best:
        return None
    schedule = Schedule.from_dict(best["schedule"])
    return schedule.decode_batch_size * schedule.num_replicas


def size_dp(at_devices: dict | None, first_report: dict, label: str) -> DpSizing:
    """The baseline's running batch from `at_devices` (the best continuous configuration at
    R = devices meeting the bound on the `label` profile), else, marked as a fallback, the
    first plan's (`first_plan_sizing`)."""
    if at_devices is not None:
        predicted = (
            f"predicted {at_devices['throughput_seq_s']:.2f} seq/s, {at_devices['latency_s']:.2f} s"
        )
        source = f"{label}: {at_devices['describe']} ({predicted})"
        return DpSizing(running_batch(at_devices), source, False)
    first = first_plan_sizing(first_report)
    reason = f"FALLBACK: no continuous configuration meets the bound {label}"
    return DpSizing(first.running_batch, f"{reason}; {first.source}", True)


def first_plan_sizing(first_report: dict) -> DpSizing:
    """The running batch of the first (uncalibrated) plan's best continuous configuration at
    any replica count, or 32 per device without one: the calibration deployment's size."""
    first = first_report["best_by_kind"].get(CONTINUOUS)
    batch = running_batch(first) or UNSIZED_BATCH * int(first_report["num_devices"])
    where = first["describe"] if first else f"{UNSIZED_BATCH} per device"
    return DpSizing(batch, f"sized from the first plan's ({where})", False)


def first_plan_pass(first: autoplan.AutoPlan, sizing: DpSizing) -> int:
    """The calibration pass's requests on continuous DP at `sizing` (the first plan's best
    continuous configuration): the one rule, on that deployment's running batch and predicted
    rate, not the first plan's."""
    continuous = first.report["best_by_kind"].get(CONTINUOUS) or first.predicted
    return calibration_pass_size(
        sizing.running_batch,
        continuous["throughput_seq_s"],
        first.plan.mean_output_tokens or math.nan,  # a plan without it is refused
    )


def continuous_at_devices(
    report: dict, request: autoplan.PlanRequest, profile: Path, bound_s: float
) -> dict | None:
    """The best continuous configuration at R = the device count that meets `bound_s` on
    `profile`: the report's own when it already has R = devices, else the planner's
    baseline search limited to that replica count (None when none meets the bound)."""
    from services.scheduler.report import prediction_to_dict
    from services.scheduler.search.plan import best_baseline
    from services.scheduler.search.space import Evaluator, SearchSpace
    from services.scheduler.simulator.predict import Simulator

    devices = int(report["num_devices"])
    best = report["best_by_kind"].get(CONTINUOUS)
    if best and Schedule.from_dict(best["schedule"]).num_replicas == devices:
        return best
    problem = autoplan.build_problem(request, profile, bound_s)
    simulator = Simulator(problem)
    kind = ScheduleKind.CONTINUOUS
    found = best_baseline(problem, simulator, Evaluator(simulator), kind, SearchSpace(), (devices,))
    return None if found is None else prediction_to_dict(found)


def best_met(baselines: list[Baseline]) -> Baseline | None:
    """The baseline with the most measured seq/s among those that met the bound."""
    met = [b for b in baselines if b.meets_bound]
    return max(met, key=lambda b: b.measured.throughput_seq_s, default=None)


def baseline_plan(
    auto: autoplan.AutoPlan, kind: str, request: autoplan.PlanRequest, profile: Path
) -> autoplan.AutoPlan | None:
    """The plan file for a baseline's best configuration at this bound (None: none meets)."""
    from services.scheduler.simulator.predict import Simulator

    best = auto.report["best_by_kind"].get(kind)
    if best is None:
        return None
    if kind == auto.report["chosen_kind"]:
        return auto
    schedule = Schedule.from_dict(best["schedule"])
    problem = autoplan.build_problem(request, profile, auto.bound_s)
    report = {
        **auto.report,
        "schedule": best["schedule"],
        "predicted": {k: v for k, v in best.items() if k != "schedule"},
        "placement": Simulator(problem).placement(schedule).to_dict(),
    }
    path = auto.path.with_suffix(f".{kind}.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return autoplan.AutoPlan(report, path, autoplan.PlanFile.from_dict(report), auto.bound_s)


def planned_config(auto: autoplan.AutoPlan, profile: Path, log_dir: Path) -> DeploymentConfig:
    return DeploymentConfig(
        num_replicas=auto.plan.num_replicas,
        schedule_file=auto.path,
        max_batch_size=auto.plan.schedule.decode_batch_size,
        kv_cache_mb=autoplan.kv_cache_mb(auto, profile),
        topology=Topology(planned=auto.plan.placement, threads_per_device=1),
        log_dir=log_dir,
        extra_worker_args=WORKER_ARGS,
    )


def dp_config(
    sizing: DpSizing, auto: autoplan.AutoPlan, profile: Path, log_dir: Path
) -> DeploymentConfig:
    """Continuous batching on `devices` replicas of one process each, each taking an equal
    share of `sizing`'s running batch (a KV pool scaled from the plan's to hold it)."""
    devices = auto.report["num_devices"]
    per_replica = max(1, sizing.running_batch // devices)
    scale = max(1.0, per_replica / auto.plan.schedule.decode_batch_size)
    return DeploymentConfig(
        num_replicas=devices,
        batching=ScheduleKind.CONTINUOUS.value,
        torch_threads=1,
        max_batch_size=per_replica,
        kv_cache_mb=math.ceil(autoplan.kv_cache_mb(auto, profile) * scale),
        log_dir=log_dir,
        extra_worker_args=WORKER_ARGS,
    )


def row_json(row: Any) -> dict:
    """One row of benchmarks/schedules.py as JSON (NaN as null)."""

    def nan_none(value: float) -> float | None:
        return None if math.isnan(value) else value

    def seq_s(base: Baseline) -> float | None:
        return base.measured.throughput_seq_s if base.measured else None

    def failed(measured: against_plan.Measured | None) -> dict | None:
        if measured is None:
            return None
        ok = valid(measured)
        return {"num_failed": measured.num_failed, "num_ok": measured.num_ok, "valid": ok}

    c, best = row.planned, row.best_baseline
    ok = valid(row.planned_measured)  # as the table reads it: an invalid burst meets nothing
    return {
        "task": row.task, "bound_s": row.bound_s, "kind": row.kind, "schedule": row.describe,
        "predicted_seq_s": c.predicted_seq_s, "measured_seq_s": c.measured_seq_s,
        "predicted_latency_s": c.predicted_latency_s,
        "first_choice": row.first.predicted["describe"], "replanned": row.first.replanned,
        "first_predicted": row.first.predicted, "first_calibrated": row.first.calibrated,
        "calibration": row.calibration, "chosen_predicted": row.chosen,
        "during_predicted": row.during.predicted if row.during else None,
        "during_calibration": row.during.calibration.describe() if row.during else None,
        "measured_latency_s": nan_none(c.measured_latency_s), "meets_bound": c.meets_bound and ok,
        "static_seq_s": seq_s(row.static), "static_meets_bound": row.static.meets_bound,
        "continuous_dp_seq_s": seq_s(row.continuous_dp),
        "continuous_dp_meets_bound": row.continuous_dp.meets_bound,
        "continuous_dp_sizing": row.dp_sizing.source,
        "continuous_dp_fallback": row.dp_sizing.fallback,
        "best_baseline": best.name if best else None,
        "vs_best_baseline": (
            c.measured_seq_s / best.measured.throughput_seq_s if best and ok else None
        ),
        "failed": {
            "planned": failed(row.planned_measured), "static": failed(row.static.measured),
            "continuous_dp": failed(row.continuous_dp.measured),
        },
    }  # fmt: skip
