"""A plan's result as a dict (the JSON of `exegpt plan --json` and `exegpt up --auto-plan`)
and as the text report `exegpt plan` prints."""

from __future__ import annotations

import math
from typing import Any

from exegpt.headroom import planned_against
from exegpt.schedule import ScheduleKind
from services.scheduler.problem import PlanProblem, PlanResult, Prediction
from services.scheduler.simulator.common import GIB
from services.scheduler.simulator.predict import Simulator


def prediction_to_dict(prediction: Prediction) -> dict[str, Any]:
    return {
        "schedule": prediction.schedule.to_dict(),
        "describe": prediction.schedule.describe(),
        "feasible": prediction.feasible,
        "throughput_seq_s": prediction.throughput_seq_s,
        "throughput_tokens_s": prediction.throughput_tokens_s,
        "latency_s": prediction.latency_s,
        "memory_bytes_per_device": list(prediction.memory_bytes_per_device),
        "utilisation_per_device": list(prediction.utilisation_per_device),
        "reason": prediction.reason,
    }


def problem_header(problem: PlanProblem, profile_name: str) -> dict[str, Any]:
    """What a plan and a simulation report first: the profile, model, workload and devices."""
    workload = problem.workload
    return {
        "profile": profile_name,
        "model": problem.cost_model.shape.model_name,
        "workload": workload.name,
        "output_p99_tokens": workload.output_p99_tokens,
        "mean_input_tokens": workload.mean_input_tokens,
        "mean_output_tokens": workload.mean_output_tokens,
        "num_devices": problem.num_devices,
    }


def result_to_dict(
    problem: PlanProblem, result: PlanResult, profile_name: str, exhaustive: bool
) -> dict[str, Any]:
    chosen = prediction_to_dict(result.chosen) if result.chosen else None
    static = result.best_by_kind.get(ScheduleKind.STATIC.value)
    speedup = None
    if result.chosen and static:
        speedup = result.chosen.throughput_seq_s / static.throughput_seq_s
    calibration = getattr(problem.cost_model, "calibration", None)
    return {
        **problem_header(problem, profile_name),
        "calibration": calibration.to_dict() | {"describe": calibration.describe()}
        if calibration is not None and calibration.num_observations
        else None,
        "kinds": [kind.value for kind in problem.kinds],
        "device_memory_bytes": problem.device_memory_bytes,
        # The user's bound (the promise) and the one the choice was made against.
        "latency_bound_s": None if math.isinf(problem.latency_bound_s) else problem.latency_bound_s,
        "latency_headroom": problem.latency_headroom,
        "planned_bound_s": (
            None if math.isinf(problem.planning_bound_s) else problem.planning_bound_s
        ),
        "meets_bound": result.meets_bound,
        "schedule": chosen["schedule"] if chosen else None,
        # Where the chosen schedule puts each layer, as simulated: `exegpt up --schedule`.
        "placement": (
            Simulator(problem).placement(result.chosen.schedule).to_dict()
            if result.chosen
            else None
        ),
        "predicted": {k: v for k, v in chosen.items() if k != "schedule"} if chosen else None,
        "speedup_vs_static": speedup,
        "best_by_kind": {k: prediction_to_dict(v) for k, v in result.best_by_kind.items()},
        "lowest_latency": (
            prediction_to_dict(result.lowest_latency) if result.lowest_latency else None
        ),
        "infeasible_reason": result.infeasible_reason or None,
        "search": {
            "mode": "exhaustive" if exhaustive else "branch-and-bound",
            "num_evaluations": result.search.num_evaluations,
            "wall_s": result.search.wall_s,
            "num_baseline_evaluations": result.search.num_baseline_evaluations,
            "baseline_wall_s": result.search.baseline_wall_s,
        },
    }


def _line(prediction: dict[str, Any]) -> str:
    peak_gib = max(prediction["memory_bytes_per_device"]) / GIB
    return (
        f"{prediction['describe']:<56} {prediction['latency_s']:>10.3f} "
        f"{prediction['throughput_seq_s']:>10.3f} {prediction['throughput_tokens_s']:>11.1f} "
        f"{peak_gib:>8.2f}"
    )


def format_report(report: dict[str, Any]) -> str:
    bound = report["latency_bound_s"]
    bound_text = "none" if bound is None else f"{bound:.3f} s"
    planned = report.get("planned_bound_s")
    with_headroom = bound is not None and planned is not None and planned < bound
    which = "the planned bound" if with_headroom else "the bound"
    if with_headroom:
        bound_text += f", {planned_against(report['latency_headroom'])} ({planned:.3f} s)"
    num_devices = report["num_devices"]
    lines = [
        f"profile {report['profile']} ({report['model']}), {num_devices} "
        f"device{'s' if num_devices > 1 else ''} x "
        f"{report['device_memory_bytes'] / GIB:.1f} GiB",
        *([f"profile {report['calibration']['describe']}"] if report["calibration"] else []),
        f"workload {report['workload']} (p99 output {report['output_p99_tokens']} tokens), "
        f"latency bound {bound_text}",
        "",
    ]
    predicted = report["predicted"]
    if predicted is not None:
        lines.append(f"chosen: {predicted['describe']}")
        lines.append(
            f"  predicted latency {predicted['latency_s']:.3f} s, throughput "
            f"{predicted['throughput_seq_s']:.3f} seq/s ({predicted['throughput_tokens_s']:.1f} "
            "tokens/s)"
        )
        if report["speedup_vs_static"] is not None:
            lines.append(f"  {report['speedup_vs_static']:.2f}x the static-batching baseline")
    elif report["infeasible_reason"]:
        lines.append(report["infeasible_reason"])
    else:
        lowest = report["lowest_latency"]
        lines.append(f"no configuration meets the latency bound of {bound_text}")
        if lowest is not None:
            lines.append(
                f"  lowest latency reachable: {lowest['latency_s']:.3f} s with "
                f"{lowest['describe']} ({lowest['throughput_seq_s']:.3f} seq/s)"
            )
    lines += ["", f"best configuration of each kind within {which}:"]
    lines.append(
        f"  {'kind':<11} {'schedule':<56} {'latency_s':>10} {'seq/s':>10} {'tokens/s':>11} "
        f"{'peak GiB':>8}"
    )
    for kind in ScheduleKind:
        best = report["best_by_kind"].get(kind.value)
        if best:
            text = _line(best)
        elif not kind.is_baseline and kind.value not in report["kinds"]:
            text = "(not searched)"
        elif kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M) and num_devices < 2:
            text = "(needs at least 2 devices)"
        else:
            text = f"(nothing meets {which})"
        lines.append(f"  {kind.value:<11} {text}")
    search = report["search"]
    lines += [
        "",
        f"search ({search['mode']}): {search['num_evaluations']} evaluations in "
        f"{search['wall_s']:.2f} s; baselines: {search['num_baseline_evaluations']} evaluations "
        f"in {search['baseline_wall_s']:.2f} s",
    ]
    return "\n".join(lines) + "\n"
