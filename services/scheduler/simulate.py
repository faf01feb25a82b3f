"""Predict one given schedule: what `exegpt simulate` and the fidelity benchmark ask.

`predict(request)` loads the profile, builds the workload, parses the schedule (a spec such as
`continuous:encode_batch_size=32,decode_batch_size=32`, or the chosen schedule of a plan JSON)
and returns the XSimulator's prediction as a dict with the keys `exegpt plan --json` writes
(`predicted.throughput_seq_s`, `predicted.latency_s`, ...). Bad input raises ValueError with
a message that names what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from exegpt.plan_file import PlanFile
from exegpt.schedule import SEARCHED_KINDS, Schedule, ScheduleKind
from exegpt.serving_overhead import serving_overhead_of
from services.scheduler.problem import PlanProblem, WorkloadDistribution
from services.scheduler.problem_builder import calibrated_model, load_cost_model
from services.scheduler.report import prediction_to_dict, problem_header
from services.scheduler.simulator.common import GIB
from services.scheduler.simulator.predict import Simulator

SCHEDULE_FIELDS = tuple(f.name for f in fields(Schedule) if f.name != "kind")
# Memory is not judged when neither the profile nor the caller knows the device's capacity.
UNKNOWN_MEMORY_BYTES = 1 << 62


@dataclass(frozen=True)
class PredictRequest:
    profile: str  # a profile file or analytic:DEVICE[:MODEL]
    workload: str  # task:ID or trace:PATH
    num_devices: int
    schedule: str | None = None  # KIND:field=value,...
    plan: str | None = None  # a plan JSON (`exegpt plan --json`)
    length_scale: float | None = None  # as `exegpt bench --length-scale` scales lengths
    gpu_memory_gb: float | None = None
    model_config: str | None = None
    # The output length whose latency is predicted (default: the workload's p99 length);
    # a sample of a task (a trace of what a burst sent) keeps the task's p99 this way.
    latency_output_tokens: int | None = None


def parse_schedule(spec: str) -> Schedule:
    """`KIND:field=value,...` with KIND one of rra, waa-c, waa-m, static, continuous and the
    fields of `Schedule`; a baseline given one batch size uses it for both."""
    kind_text, _, rest = spec.partition(":")
    try:
        kind = ScheduleKind(kind_text.strip())
    except ValueError:
        names = ", ".join(k.value for k in ScheduleKind)
        raise ValueError(f"--schedule {spec!r}: unknown kind {kind_text!r}; use {names}") from None
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or name not in SCHEDULE_FIELDS:
            raise ValueError(
                f"--schedule {spec!r}: {item!r} is not FIELD=VALUE with FIELD one of "
                f"{', '.join(SCHEDULE_FIELDS)}"
            )
        try:
            values[name] = int(value)
        except ValueError:
            raise ValueError(f"--schedule {spec!r}: {name} must be an integer") from None
    if kind.is_baseline:
        batch = values.get("decode_batch_size", values.get("encode_batch_size"))
        if batch is not None:
            values.setdefault("encode_batch_size", batch)
            values.setdefault("decode_batch_size", batch)
    missing = [n for n in ("encode_batch_size", "decode_batch_size") if n not in values]
    if missing:
        raise ValueError(f"--schedule {spec!r}: give {' and '.join(missing)}")
    try:
        return Schedule(kind=kind, **values)
    except ValueError as error:
        raise ValueError(f"--schedule {spec!r}: {error}") from None


def workload_of(spec: str, length_scale: float | None, max_context: int) -> WorkloadDistribution:
    """The workload as `exegpt bench` sends it: a task's lengths scaled request by request
    (exegpt/workloads.py `scale_length`), a trace's by the trace reader."""
    if length_scale is not None and not (length_scale > 0 and math.isfinite(length_scale)):
        raise ValueError(f"--length-scale must be positive, got {length_scale}")
    if spec.startswith("task:"):
        scale = 1.0 if length_scale is None else length_scale
        return WorkloadDistribution.from_scaled_task(spec.removeprefix("task:"), scale)
    return WorkloadDistribution.parse(
        spec, max_context_tokens=max_context, length_scale=length_scale
    )


def build_problem(request: PredictRequest) -> tuple[PlanProblem, Schedule, str, bool]:
    """(problem, schedule, profile name, whether memory is judged) for a request."""
    if request.num_devices < 1:
        raise ValueError(f"--devices must be at least 1, got {request.num_devices}")
    if (request.schedule is None) == (request.plan is None):
        raise ValueError("give exactly one of --schedule KIND:field=value,... and --plan FILE")
    if request.schedule is not None:
        schedule = parse_schedule(request.schedule)
    else:
        schedule = PlanFile.read(Path(str(request.plan))).schedule
    loaded = load_cost_model(request.profile, request.model_config)
    cost_model, memory_bytes, name = (
        calibrated_model(loaded),
        loaded.device_memory_bytes,
        loaded.name,
    )
    if request.gpu_memory_gb is not None:
        if not request.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb must be positive, got {request.gpu_memory_gb}")
        memory_bytes = int(request.gpu_memory_gb * GIB)
    workload = workload_of(
        request.workload, request.length_scale, cost_model.shape.max_context_tokens
    )
    if request.latency_output_tokens is not None:
        if request.latency_output_tokens < 1:
            raise ValueError(
                f"the latency's output length must be >= 1, got {request.latency_output_tokens}"
            )
        workload = replace(workload, declared_output_p99_tokens=request.latency_output_tokens)
    # The kinds a plan would search; the simulator predicts any kind given to it.
    kinds = (ScheduleKind.RRA,) if request.num_devices < 2 else SEARCHED_KINDS
    problem = PlanProblem(
        cost_model=cost_model,
        workload=workload,
        latency_bound_s=math.inf,
        num_devices=request.num_devices,
        device_memory_bytes=memory_bytes or UNKNOWN_MEMORY_BYTES,
        kinds=kinds,
    )
    return problem, schedule, name, memory_bytes is not None


def predict(request: PredictRequest) -> dict[str, Any]:
    """The prediction of one schedule, keyed as `exegpt plan --json` writes a plan."""
    problem, schedule, name, memory_known = build_problem(request)
    simulator = Simulator(problem)
    prediction = simulator.simulate(schedule)
    predicted = prediction_to_dict(prediction)
    overhead = serving_overhead_of(problem.cost_model)
    return {
        **problem_header(problem, name),
        "device_memory_bytes": problem.device_memory_bytes if memory_known else None,
        "schedule": predicted.pop("schedule"),
        "placement": simulator.placement(schedule).to_dict(),
        "predicted": predicted,
        "serving_overhead": {
            "step_s": overhead.step_s,
            "token_s": overhead.token_s,
            "request_s": overhead.request_s,
        },
    }
