"""The one-command path (`exegpt up --plan`, `exegpt demo`): profile, plan, then deploy.

1. **Profile** the model on this machine as the stage processes will run it (device, dtype,
   threads per device), cached under the profile directory by model, config hash, device,
   dtype, threads and grid: a cached profile that loads is reused, else `exegpt profile` runs
   (its progress bar on stderr).
2. **Plan** for the workload and bound on N devices. The honest answer is the best predicted
   schedule of any kind, the baselines included: when static or continuous batching is
   predicted to beat RRA and WAA within the bound, it is chosen, and the margin is reported.
3. **Deploy** the plan as `exegpt up --schedule` does: the plan JSON is written beside the
   profile and handed to the workers; the replica's running batch (`--max-batch-size`) and
   KV pool (`--kv-cache-mb`) are sized for the plan's B_D.

A task's lengths can be scaled (`length_scale`) as `exegpt bench --length-scale` scales
them, so plans and benchmarks stay tractable on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from exegpt.headroom import DEFAULT_LATENCY_HEADROOM, add_headroom_argument, planned_against
from exegpt.plan_file import PlanFile
from exegpt.schedule import ScheduleKind

DEFAULT_PROFILE_DIR = Path("~/.cache/exegpt/profiles")
# The "auto" grid: small enough to profile in about 20 s on 2 cores (plus about 12 s of
# serving), wide enough for the plans it serves. Those pick batches of 100 to 800 rows on a
# CPU, so the grid reaches 256 rows and 16384 tokens; past that the simulator extrapolates
# linearly (layer_profile.py counts and warns). Decode attention is measured at cached
# lengths a factor 8 apart: its cost is about a + b x length, and with points 64x apart
# (1, 64, 512 before) interpolation overpriced the lengths between them, the tasks' usual
# ones, by 21% at 16 rows to 39% at 256 (task T's lengths). That error grew with the batch,
# so a calibration factor read on one schedule's steps (calibration_pass.py) did not carry to
# another's; on this grid the same decode steps of 16 to 256 rows come within 6% and 512
# rows (extrapolated) within 18% (docs/measurements.md). A cached profile of another grid
# is measured again (`_loads`).
AUTO_GRID = {
    "batch_sizes": "1,4,32,256",
    "seq_lens": "16,128",
    "kv_lens": "1,8,64,512",
    "num_tokens": "1,16,256,2048,16384",
    "message_bytes": "1024,1048576",
    "warmup": "1",
    "repeats": "3",
    "rounds": "1",
}
AUTO_BOUND_QUANTILE = 0.3  # `auto` bound: this quantile of static batching's latencies
KV_HEADROOM = 1.2
MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser, *, plan_flag: bool = True) -> None:
    """The planning flags (`exegpt up --plan ...`, and `exegpt demo` without --plan)."""
    group = parser.add_argument_group("one-command planning (--plan)")
    if plan_flag:
        group.add_argument(
            "--plan",
            action="store_true",
            help="profile this machine (cached), plan for --workload and --latency-bound on "
            "--devices, print the choice, and deploy it",
        )
    group.add_argument("--workload", default="task:S", help="task:S|T|G|C1|C2 or trace:PATH")
    group.add_argument(
        "--latency-bound",
        default="auto",
        help="seconds for a p99-length output, inf, or auto (30%% quantile of static "
        "batching's predicted latencies)",
    )
    add_headroom_argument(group)
    group.add_argument("--devices", type=int, default=2, help="stage processes per replica")
    group.add_argument(
        "--length-scale", type=float, default=None, help="multiply the workload's lengths"
    )
    group.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(os.environ.get("EXEGPT_PROFILE_DIR", DEFAULT_PROFILE_DIR)),
        help="profile cache (EXEGPT_PROFILE_DIR)",
    )
    group.add_argument(
        "--profile-grid",
        default="auto",
        help="auto (about a minute), quick, full, or a grid JSON file",
    )
    group.add_argument(
        "--profile", type=Path, default=None, help="plan with this profile instead of the cache"
    )
    group.add_argument(
        "--device-memory-gb", type=float, default=1.0, help="memory per device for the plan"
    )


@dataclass(frozen=True)
class PlanRequest:
    model: str = "exegpt-tiny-t5"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    workload: str = "task:S"
    latency_bound: str = "auto"
    latency_headroom: float = DEFAULT_LATENCY_HEADROOM
    num_devices: int = 2
    length_scale: float | None = None
    device_memory_gb: float = 1.0
    profile_dir: Path = DEFAULT_PROFILE_DIR
    profile_grid: str = "auto"
    profile: Path | None = None  # a given profile: no cache, no profiling


@dataclass(frozen=True)
class AutoPlan:
    """The honest choice, its prediction, the baselines it beat (or lost to) and the file."""

    report: dict[str, Any]
    path: Path
    plan: PlanFile
    bound_s: float
    margins: dict[str, float] = field(default_factory=dict)  # kind -> chosen / best of kind

    @property
    def predicted(self) -> dict[str, Any]:
        return self.report["predicted"]


def request_from_args(args: argparse.Namespace, num_replicas: int = 1) -> PlanRequest:
    threads = getattr(args, "threads_per_device", None) or threads_per_device(
        args.devices * num_replicas
    )
    device = "cuda" if str(getattr(args, "device", "cpu")).startswith("cuda") else "cpu"
    return PlanRequest(
        model=args.model,
        dtype=resolved_dtype(getattr(args, "dtype", "float32"), device),
        device=device,
        threads=threads,
        workload=args.workload,
        latency_bound=str(args.latency_bound),
        latency_headroom=getattr(args, "latency_headroom", DEFAULT_LATENCY_HEADROOM),
        num_devices=args.devices,
        length_scale=args.length_scale,
        device_memory_gb=args.device_memory_gb,
        profile_dir=Path(args.profile_dir).expanduser(),
        profile_grid=args.profile_grid,
        profile=args.profile,
    )


def threads_per_device(num_processes: int) -> int:
    """What `exegpt up` gives each stage process by default: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, num_processes))


def resolved_dtype(name: str, device: str) -> str:
    from exegpt.dtypes import dtype_name, resolve_dtype

    return dtype_name(resolve_dtype(name, device))


# ---- profile -------------------------------------------------------------------------------


def profile_path(request: PlanRequest) -> Path:
    """Where the cache keeps this model's profile for this device, dtype, threads and grid."""
    from services.profiler.measure.run import model_config

    config_hash = model_config(request.model).config_hash()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(request.model).name).strip("-") or "model"
    grid = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(request.profile_grid).stem)
    name = f"{slug}-{config_hash[:12]}.{request.device}.{request.dtype}.t{request.threads}.{grid}"
    return request.profile_dir / f"{name}.json"


def profile_command(request: PlanRequest, out: Path) -> list[str]:
    grid = ["--grid", request.profile_grid]
    if request.profile_grid == "auto":
        grid = ["--grid", "custom"]
        for flag, value in AUTO_GRID.items():
            grid += [f"--{flag.replace('_', '-')}", value]
    return [
        sys.executable, "-m", "exegpt.commands.cli", "profile", "--model", request.model,
        "--device", request.device, "--dtype", request.dtype, "--tp", "1",
        "--threads", str(request.threads), *grid, "--serving", "--out", str(out),
    ]  # fmt: skip


def ensure_profile(request: PlanRequest, out: TextIO = sys.stdout) -> Path:
    """The profile to plan with: the given one, the cached one, or a fresh measurement."""
    if request.profile is not None:
        return request.profile
    path = profile_path(request)
    if path.is_file() and _loads(path, request):
        out.write(f"profile: cached {path}\n")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    out.write(
        f"profile: measuring {request.model} on {request.device} ({request.dtype}, "
        f"{request.threads} thread(s) per device, grid {request.profile_grid}) -> {path}\n"
    )
    out.flush()
    result = subprocess.run(profile_command(request, path), stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ValueError(f"profiling failed (exit {result.returncode})")
    out.write(result.stdout)
    return path


def _loads(path: Path, request: PlanRequest) -> bool:
    """A cached profile is used when it loads, carries the serving path's host work (the
    planner prices it beside the forwards), timed the Linear kernel serving runs here and,
    for the auto grid, was measured at today's `AUTO_GRID` sizes; one measured otherwise is
    measured again."""
    from exegpt.dtypes import torch_dtype
    from exegpt.models.prepack import linear_kernel
    from exegpt.profile.format import ProfileError, read_profile
    from exegpt.profile.layer_profile import load_profile

    try:
        load_profile(str(path))
        data = read_profile(path)
    except (ProfileError, ValueError, OSError):
        return False
    serving_kernel = linear_kernel(torch_dtype(request.dtype), request.device)
    if request.profile_grid == "auto" and not _on_auto_grid(
        data.grid, data.model.max_context_tokens
    ):
        return False
    return data.serving is not None and data.model.linear_kernel == serving_kernel


def _on_auto_grid(grid: dict[str, Any], max_context_tokens: int) -> bool:
    """Whether a profile's recorded grid (ProfileData.grid) has the auto grid's size axes as
    the profiler records them for a model of `max_context_tokens` (lengths past the context
    dropped: ProfileGrid.for_context)."""
    from services.profiler.cli import AXIS_FLAGS

    for flag, field_name in AXIS_FLAGS.items():
        sizes = [int(size) for size in AUTO_GRID[flag].split(",")]
        if field_name in ("seq_lens_tokens", "kv_lens_tokens"):
            sizes = [size for size in sizes if size <= max_context_tokens]
        if list(grid.get(field_name, ())) != sizes:
            return False
    return True


# ---- plan ----------------------------------------------------------------------------------


def scaled_task(task_id: str, length_scale: float) -> Any:
    """A task's distribution with lengths scaled as `exegpt bench --length-scale` does."""
    from services.scheduler.problem import WorkloadDistribution

    return WorkloadDistribution.from_scaled_task(task_id, length_scale)


def workload_distribution(spec: str, length_scale: float | None, max_context: int) -> Any:
    from services.scheduler.problem import WorkloadDistribution

    kind, _, value = spec.partition(":")
    if kind == "task" and value:
        return scaled_task(value, 1.0 if length_scale is None else length_scale)
    return WorkloadDistribution.parse(
        spec, max_context_tokens=max_context, length_scale=length_scale
    )


def build_problem(request: PlanRequest, profile: Path, bound_s: float = math.inf) -> Any:
    """The plan's problem, built by the scheduler's one problem builder."""
    from services.scheduler import problem_builder
    from services.scheduler.profile_dtype import check_profile_dtype
    from services.scheduler.simulator.common import GIB

    if request.num_devices < 1 or not request.device_memory_gb > 0:
        raise ValueError("--devices must be >= 1 and --device-memory-gb positive")
    # Queries past a small grid are extrapolated and each one logged: the plan is the report.
    logging.getLogger("exegpt.profile.layer_profile").setLevel(logging.ERROR)
    loaded = problem_builder.load_cost_model(str(profile))
    check_profile_dtype(loaded.model, request.dtype, str(profile))
    workload = workload_distribution(
        request.workload, request.length_scale, loaded.model.shape.max_context_tokens
    )
    plan_request = problem_builder.ProblemRequest(
        workload=workload,
        latency_bound_s=bound_s,
        num_devices=request.num_devices,
        device_memory_bytes=int(request.device_memory_gb * GIB),
        latency_headroom=request.latency_headroom,
    )
    return problem_builder.build_problem(plan_request, loaded)


def resolve_bound(text: str, problem: Any) -> float:
    """Seconds from `S`, `inf`, `auto` or `auto:Q` (a quantile of static latencies)."""
    from services.scheduler.problem_builder import parse_latency_bound
    from services.scheduler.search.plan import static_latency_bounds

    if text.startswith("auto"):
        quantile = float(text.partition(":")[2] or AUTO_BOUND_QUANTILE)
        return static_latency_bounds(problem, (quantile,))[0]
    return parse_latency_bound(text)


def make_plan(request: PlanRequest, profile: Path, out_dir: Path | None = None) -> AutoPlan:
    """Plan on `profile`, choose the best schedule of any kind, write it; ValueError if none."""
    from dataclasses import replace

    from services.scheduler.report import prediction_to_dict, result_to_dict
    from services.scheduler.search.plan import plan
    from services.scheduler.simulator.predict import Simulator

    problem = build_problem(request, profile)
    bound_s = resolve_bound(request.latency_bound, problem)
    problem = replace(problem, latency_bound_s=bound_s)
    result = plan(problem)
    report = result_to_dict(problem, result, str(profile), exhaustive=False)
    best = result.chosen  # the best of any kind, the baselines included
    if best is None:
        raise ValueError(_no_plan(report, bound_s))
    chosen = prediction_to_dict(best)
    report["schedule"] = chosen.pop("schedule")
    report["predicted"] = chosen
    report["chosen_kind"] = best.schedule.kind.value
    report["placement"] = Simulator(problem).placement(best.schedule).to_dict()
    margins = {
        kind: best.throughput_seq_s / p.throughput_seq_s
        for kind, p in result.best_by_kind.items()
        if kind != best.schedule.kind.value and p.throughput_seq_s > 0
    }
    report["margins"] = margins
    report["max_input_tokens"] = problem.workload.max_input_tokens
    report["max_output_tokens"] = problem.workload.max_output_tokens
    directory = out_dir or request.profile_dir / "plans"
    directory.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{request.workload}-{bound_s:.3g}s")
    path = directory / f"{Path(profile).stem}.{request.num_devices}dev.{slug}.plan.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return AutoPlan(report, path, PlanFile.from_dict(report, str(path)), bound_s, margins)


def _no_plan(report: dict[str, Any], bound_s: float) -> str:
    lowest = report.get("lowest_latency")
    text = f"no schedule meets the latency bound of {bound_s:.3f} s"
    if lowest:
        text += f" (the lowest reachable is {lowest['latency_s']:.3f} s: {lowest['describe']})"
    return report.get("infeasible_reason") or text


def format_choice(auto: AutoPlan) -> str:
    """The chosen schedule, its prediction, and how it compares with every other kind."""
    report, predicted = auto.report, auto.predicted
    headroom = report.get("latency_headroom") or 0.0
    planned, which = "", "the bound"
    if headroom and math.isfinite(auto.bound_s):
        planned, which = f", {planned_against(headroom)}", "the planned bound"
    lines = [
        f"plan: {report['workload']} on {report['num_devices']} device(s), latency bound "
        f"{auto.bound_s:.3f} s{planned} (p99 output {report['output_p99_tokens']} tokens)",
        f"  chosen: {predicted['describe']}",
        f"  predicted: {predicted['throughput_seq_s']:.2f} seq/s, p99-length latency "
        f"{predicted['latency_s']:.3f} s",
    ]
    beaten = [
        f"{auto.margins[kind.value]:.2f}x {kind.value}"
        for kind in ScheduleKind
        if kind.value in auto.margins
    ]
    missing = [k.value for k in ScheduleKind if k.value not in auto.margins]
    missing.remove(report["chosen_kind"])
    lines.append(
        f"  {report['chosen_kind']} won: {', '.join(beaten) or f'nothing else meets {which}'}"
        + (f" (none within {which}: {', '.join(missing)})" if missing else "")
    )
    lines.append(f"  plan file: {auto.path}")
    return "\n".join(lines)


# ---- deployment ----------------------------------------------------------------------------


def kv_cache_mb(auto: AutoPlan, problem_profile: Path, floor_mb: float = 256.0) -> float:
    """A KV pool per replica holding B_D sequences at the workload's longest lengths."""
    from services.scheduler.problem_builder import load_cost_model

    cost_model = load_cost_model(str(problem_profile)).model
    shape = cost_model.shape
    per_token = shape.num_decode_layers * (
        cost_model.kv_bytes_per_token(1) + cost_model.cross_kv_bytes_per_token(1)
    )
    report = auto.report
    tokens = report["max_input_tokens"] + report["max_output_tokens"] + 32  # 2 part blocks
    need = auto.plan.schedule.decode_batch_size * tokens * per_token * KV_HEADROOM
    return max(floor_mb, math.ceil(need / MIB))


def prepare_up(args: argparse.Namespace, out: TextIO = sys.stdout) -> AutoPlan:
    """`exegpt up --plan`: profile, plan, print, and point the launcher's flags at the plan."""
    if args.schedule is not None:
        raise ValueError("give --plan or --schedule, not both")
    request = request_from_args(args, args.replicas)
    profile = ensure_profile(request, out)
    auto = make_plan(request, profile)
    out.write(format_choice(auto) + "\n")
    out.flush()
    args.schedule = auto.path
    args.max_batch_size = auto.plan.schedule.decode_batch_size
    args.kv_cache_mb = max(args.kv_cache_mb, kv_cache_mb(auto, profile))
    if args.threads_per_device is None:
        args.threads_per_device = request.threads
    return auto
