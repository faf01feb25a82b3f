"""`exegpt plan`: search the best schedule for a profile, a workload and a latency bound.

Prints the chosen schedule with its predicted latency and throughput, the best configuration
of every kind and of both baselines, and what the search cost; `--json` writes the same.
Bad input gives exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exegpt.headroom import add_headroom_argument
from exegpt.schedule import ScheduleKind, searched_kinds
from services.scheduler import problem_builder
from services.scheduler.problem import PlanProblem, PlanResult
from services.scheduler.problem_builder import (
    ProblemRequest,
    load_cost_model,
    parse_latency_bound,
)
from services.scheduler.profile_dtype import check_profile_dtype
from services.scheduler.report import format_report, result_to_dict
from services.scheduler.search.plan import plan
from services.scheduler.simulator.common import GIB

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
    add_headroom_argument(parser)
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


def build_problem(args: argparse.Namespace) -> tuple[PlanProblem, str]:
    """The options as a `ProblemRequest`, built by the scheduler's one problem builder."""
    for option in ("profile", "workload", "latency_bound", "gpus"):
        if getattr(args, option) is None:
            raise ValueError(f"--{option.replace('_', '-')} is required")
    bound_s = parse_latency_bound(args.latency_bound)
    loaded = load_cost_model(args.profile, args.model_config)
    check_profile_dtype(loaded.model, getattr(args, "dtype", None), loaded.name)
    if args.gpu_memory_gb is None and loaded.device_memory_bytes is None:
        raise ValueError("the profile does not record the device memory: give --gpu-memory-gb")
    if args.gpu_memory_gb is not None and not args.gpu_memory_gb > 0:
        raise ValueError(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb}")
    request = ProblemRequest(
        workload=args.workload,
        latency_bound_s=bound_s,
        num_devices=args.gpus,
        device_memory_bytes=None if args.gpu_memory_gb is None else int(args.gpu_memory_gb * GIB),
        kinds=_kinds(args.kinds),
        tp_degrees=_ints(args.tp_degrees, "--tp-degrees") if args.tp_degrees else (),
        throughput_tolerance=args.throughput_tolerance,
        latency_tolerance_s=args.latency_tolerance_s,
        length_scale=args.length_scale,
        latency_headroom=args.latency_headroom,
    )
    return problem_builder.build_problem(request, loaded), loaded.name


def _kinds(text: str) -> tuple[ScheduleKind, ...]:
    kinds = searched_kinds(text.split(","))
    if not kinds:
        raise ValueError("--kinds names no schedule kind")
    return kinds


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes positive integers, got {text!r}")
    return values


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
