"""`exegpt plan`: search the best schedule for a profile, a workload and a latency bound.

Prints the chosen schedule with its predicted latency and throughput, the best configuration
of every kind and of both baselines, and what the search cost; `--json` writes the same.
Bad input gives exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from exegpt.cost_model import CostModel
from exegpt.schedule import ScheduleKind, searched_kinds
from services.scheduler.problem import PlanProblem, PlanResult, Prediction, WorkloadDistribution
from services.scheduler.profile_dtype import check_profile_dtype
from services.scheduler.simulator.common import GIB
from services.scheduler.simulator.predict import Simulator

DESCRIPTION = "search the best schedule under a latency bound (XSimulator + XScheduler)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        help="profile JSON written by `exegpt profile`, or analytic:DEVICE[:MODEL] "
        "(a roofline model; devices a40, a100-40gb, a100-80gb, h100-80gb, cpu; models "
        "exegpt-tiny-t5 (default), t5-11b, opt-13b, llama-2-7b)",
    )
    parser.add_argument("--model-config", help="HF config.json for an analytic:DEVICE profile")
    parser.add_argument(
        "--dtype",
        help="dtype the workers run in (float32, bfloat16, float16, or auto as resolved on "
        "this machine); a profile measured in another dtype is refused (default: the "
        "profile's own)",
    )
    parser.add_argument("--workload", help="task:S|T|G|C1|C2 or trace:PATH")
    parser.add_argument(
        "--length-scale",
        type=float,
        help="multiply a trace's token counts by this (inputs are then clamped to the model's "
        "context); only with trace:PATH",
    )
    parser.add_argument("--latency-bound", help="seconds for a p99-length output, or inf")
    parser.add_argument("--gpus", type=int, help="number of devices")
    parser.add_argument("--gpu-memory-gb", type=float, help="memory per device in GiB")
    parser.add_argument("--kinds", default="rra,waa-c,waa-m", help="schedule kinds to search")
    parser.add_argument("--tp-degrees", help="TP degrees to consider (default: the profile's)")
    parser.add_argument(
        "--throughput-tolerance",
        type=float,
        default=0.01,
        help="eps_T: branch-and-bound keeps a box whose throughput bound is within this "
        "fraction below the incumbent (slack for non-monotonic points; default 0.01)",
    )
    parser.add_argument(
        "--latency-tolerance-s",
        type=float,
        default=0.0,
        help="eps_L: keep a box whose lowest latency is within this many seconds over the bound",
    )
    parser.add_argument("--exhaustive", action="store_true", help="evaluate every point")
    parser.add_argument("--json", help="write the result as JSON to this file")
    parser.add_argument("--plot-frontier", help="PNG: latency vs throughput of every point")
    parser.add_argument("--plot-timeline", help="PNG: per-device Gantt chart of the choice")


def run(args: argparse.Namespace) -> int:
    try:
        problem, profile_name = build_problem(args)
        from services.scheduler.search.plan import plan

        result = plan(problem, exhaustive=args.exhaustive)
    except ValueError as error:
        sys.stderr.write(f"exegpt plan: error: {error}\n")
        return 2
    report = result_to_dict(problem, result, profile_name, args.exhaustive)
    sys.stdout.write(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot_frontier or args.plot_timeline:
        _plots(args, problem, result, profile_name)
    return 0


# ---- input ---------------------------------------------------------------------------------


def build_problem(args: argparse.Namespace) -> tuple[PlanProblem, str]:
    for option in ("profile", "workload", "latency_bound", "gpus"):
        if getattr(args, option) is None:
            raise ValueError(f"--{option.replace('_', '-')} is required")
    bound_s = parse_bound(args.latency_bound)
    if args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
    cost_model, default_memory_bytes, profile_name = load_cost_model(
        args.profile, args.model_config
    )
    check_profile_dtype(cost_model, getattr(args, "dtype", None), profile_name)
    if args.tp_degrees:
        from services.scheduler.calibration import ScaledCostModel

        degrees = tuple(sorted({1, *_ints(args.tp_degrees, "--tp-degrees")}))
        if degrees[-1] > args.gpus:
            raise ValueError(
                f"contradictory options: TP degree {degrees[-1]} needs {degrees[-1]} devices "
                f"but --gpus is {args.gpus}"
            )
        cost_model = ScaledCostModel(cost_model, tp_degrees=degrees)
    if args.gpu_memory_gb is not None:
        if not args.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb}")
        memory_bytes = int(args.gpu_memory_gb * GIB)
    elif default_memory_bytes is None:
        raise ValueError("the profile does not record the device memory: give --gpu-memory-gb")
    else:
        memory_bytes = default_memory_bytes
    if not (args.throughput_tolerance >= 0 and args.latency_tolerance_s >= 0):
        raise ValueError("tolerances must be non-negative")
    workload = WorkloadDistribution.parse(
        args.workload,
        max_context_tokens=cost_model.shape.max_context_tokens,
        length_scale=args.length_scale,
    )
    problem = PlanProblem(
        cost_model=cost_model,
        workload=workload,
        latency_bound_s=bound_s,
        num_devices=args.gpus,
        device_memory_bytes=memory_bytes,
        kinds=parse_kinds(args.kinds),
        throughput_tolerance=args.throughput_tolerance,
        latency_tolerance_s=args.latency_tolerance_s,
    )
    return problem, profile_name


def parse_bound(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        bound_s = float(text)
    except ValueError:
        raise ValueError(
            f"--latency-bound must be a number of seconds or inf, got {text!r}"
        ) from None
    if not bound_s > 0:
        raise ValueError(f"--latency-bound must be positive, got {text}")
    return bound_s


def parse_kinds(text: str) -> tuple[ScheduleKind, ...]:
    kinds = searched_kinds(text.split(","))
    if not kinds:
        raise ValueError("--kinds names no schedule kind")
    return kinds


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes positive integers, got {text!r}")
    return values


def load_cost_model(spec: str, model_config: str | None) -> tuple[CostModel, int | None, str]:
    """(cost model, device memory in bytes if the profile knows it, a name for reports)."""
    if spec.startswith("analytic:"):
        from services.scheduler.analytic_cost import analytic_cost_model

        model = analytic_cost_model(spec.removeprefix("analytic:"), model_config)
        return model, model.device.memory_bytes, spec
    if model_config is not None:
        raise ValueError("--model-config only applies to an analytic:DEVICE profile")
    return load_profile_file(spec)


def load_profile_file(path: str) -> tuple[CostModel, int | None, str]:
    """A profile written by the profiler (imported lazily: it is a separate service)."""
    if not Path(path).is_file():
        raise ValueError(f"profile not found: {path} (or use analytic:DEVICE[:MODEL])")
    try:
        profile_module = importlib.import_module("exegpt.profile.layer_profile")
    except ImportError as error:
        raise ValueError(f"cannot load profile files here: {error}") from None
    profile = profile_module.load_profile(path)
    memory_bytes = getattr(profile, "device_memory_bytes", None)
    return profile, int(memory_bytes) if memory_bytes else None, path


# ---- output --------------------------------------------------------------------------------


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


def result_to_dict(
    problem: PlanProblem, result: PlanResult, profile_name: str, exhaustive: bool
) -> dict[str, Any]:
    chosen = prediction_to_dict(result.chosen) if result.chosen else None
    static = result.best_by_kind.get(ScheduleKind.STATIC.value)
    speedup = None
    if result.chosen and static:
        speedup = result.chosen.throughput_seq_s / static.throughput_seq_s
    workload = problem.workload
    return {
        "profile": profile_name,
        "model": problem.cost_model.shape.model_name,
        "workload": workload.name,
        "output_p99_tokens": workload.output_p99_tokens,
        "mean_input_tokens": workload.mean_input_tokens,
        "mean_output_tokens": workload.mean_output_tokens,
        "num_devices": problem.num_devices,
        "kinds": [kind.value for kind in problem.kinds],
        "device_memory_bytes": problem.device_memory_bytes,
        "latency_bound_s": None if math.isinf(problem.latency_bound_s) else problem.latency_bound_s,
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
    num_devices = report["num_devices"]
    lines = [
        f"profile {report['profile']} ({report['model']}), {num_devices} "
        f"device{'s' if num_devices > 1 else ''} x "
        f"{report['device_memory_bytes'] / GIB:.1f} GiB",
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
        for kind in (ScheduleKind.STATIC, ScheduleKind.CONTINUOUS):
            baseline = report["best_by_kind"].get(kind.value)
            if baseline and baseline["throughput_seq_s"] > predicted["throughput_seq_s"]:
                ratio = baseline["throughput_seq_s"] / predicted["throughput_seq_s"]
                lines.append(
                    f"  note: the {kind.value} baseline does {ratio:.2f}x better within the bound"
                )
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
    lines += ["", "best configuration of each kind within the bound:"]
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
            text = "(nothing meets the bound)"
        lines.append(f"  {kind.value:<11} {text}")
    search = report["search"]
    lines += [
        "",
        f"search ({search['mode']}): {search['num_evaluations']} evaluations in "
        f"{search['wall_s']:.2f} s; baselines: {search['num_baseline_evaluations']} evaluations "
        f"in {search['baseline_wall_s']:.2f} s",
    ]
    return "\n".join(lines) + "\n"


def _plots(args: argparse.Namespace, problem: PlanProblem, result: PlanResult, name: str) -> None:
    from services.scheduler import plots
    from services.scheduler.simulator.predict import timeline

    title = (
        f"{problem.cost_model.shape.model_name} ({name}), {problem.workload.name}, "
        f"{problem.num_devices} devices"
    )
    if args.plot_frontier:
        plots.plot_frontier(result, problem.latency_bound_s, args.plot_frontier, title)
    if args.plot_timeline:
        shown = result.chosen or result.lowest_latency
        if shown is None:
            sys.stderr.write("exegpt plan: no feasible schedule, no timeline to plot\n")
            return
        events = timeline(problem, shown.schedule)
        plots.plot_timeline(
            events,
            problem.num_devices,
            args.plot_timeline,
            f"{shown.schedule.describe()}  ({problem.workload.name}): "
            f"{shown.throughput_seq_s:.2f} seq/s, p99 latency {shown.latency_s:.3f} s",
        )
