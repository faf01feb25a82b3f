"""What a user asks for, checked and turned into a `PlanProblem`: the one builder behind
`exegpt plan`, the Plan RPC and `exegpt up --auto-plan`.

Every rejection is a ValueError whose message says what to change; the service answers it
with INVALID_ARGUMENT, the command line with exit status 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from exegpt.cost_model import CostModel
from exegpt.headroom import DEFAULT_LATENCY_HEADROOM
from exegpt.profile.layer_profile import load_profile
from exegpt.schedule import SEARCHED_KINDS, ScheduleKind
from services.scheduler.analytic_cost import analytic_cost_model
from services.scheduler.calibration import ScaledCostModel
from services.scheduler.calibration_store import calibration_path, load_calibration
from services.scheduler.problem import PlanProblem, WorkloadDistribution

ANALYTIC_PREFIX = "analytic:"


@dataclass(frozen=True)
class LoadedCostModel:
    """A cost model and what a plan needs to know about where it came from."""

    model: CostModel
    name: str  # for reports: the spec or the profile's path
    device_memory_bytes: int | None  # the device's capacity when the source knows it
    calibration_path: Path | None = None  # where its calibration is kept (calibration_store.py)


@dataclass(frozen=True)
class ProblemRequest:
    """The knobs of one plan; `device_memory_bytes=None` takes the cost model's device."""

    workload: str | WorkloadDistribution  # a spec (task:ID, trace:PATH) or one already built
    latency_bound_s: float  # math.inf: no bound
    num_devices: int
    device_memory_bytes: int | None = None
    kinds: tuple[ScheduleKind, ...] = SEARCHED_KINDS
    tp_degrees: tuple[int, ...] = ()  # empty: every degree the profile has
    throughput_tolerance: float = 0.01
    latency_tolerance_s: float = 0.0
    length_scale: float | None = None  # trace workloads only
    # Planned against latency_bound_s x (1 - latency_headroom) (exegpt/headroom.py).
    latency_headroom: float = DEFAULT_LATENCY_HEADROOM


def load_cost_model(spec: str, model_config: str | None = None) -> LoadedCostModel:
    """`analytic:DEVICE[:MODEL]` (the roofline model of analytic_cost.py, for tests and
    what-ifs, e.g. analytic:a40:opt-13b) or a profile file written by the profiler.
    `model_config` (a HF config.json or its directory) is the model of an `analytic:DEVICE`
    that names no model preset."""
    if spec.startswith(ANALYTIC_PREFIX):
        model = analytic_cost_model(spec.removeprefix(ANALYTIC_PREFIX), model_config)
        return LoadedCostModel(model, spec, model.device.memory_bytes)
    if model_config is not None:
        raise ValueError("a model config only applies to an analytic:DEVICE profile")
    if not Path(spec).is_file():
        raise ValueError(f"profile not found: {spec} (or use analytic:DEVICE[:MODEL])")
    return LoadedCostModel(load_profile(spec), spec, None, calibration_path(spec))


def parse_latency_bound(text: str) -> float:
    """Seconds, or `inf`/`infinity`/`none` for no bound."""
    if text.strip().lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        bound_s = float(text)
    except ValueError:
        raise ValueError(
            f"the latency bound must be a number of seconds or inf, got {text!r}"
        ) from None
    if not bound_s > 0:
        raise ValueError(f"the latency bound must be positive, got {text}")
    return bound_s


def build_problem(request: ProblemRequest, loaded: LoadedCostModel) -> PlanProblem:
    """Check `request` against the cost model and build the problem it asks for."""
    if not request.latency_bound_s > 0:
        raise ValueError(f"the latency bound must be positive, got {request.latency_bound_s}")
    if request.num_devices < 1:
        raise ValueError(f"the number of devices must be at least 1, got {request.num_devices}")
    return PlanProblem(
        cost_model=_restricted(loaded, request),
        workload=_workload(request, loaded.model),
        latency_bound_s=request.latency_bound_s,
        num_devices=request.num_devices,
        device_memory_bytes=_memory_bytes(request, loaded),
        kinds=request.kinds,
        throughput_tolerance=request.throughput_tolerance,
        latency_tolerance_s=request.latency_tolerance_s,
        latency_headroom=request.latency_headroom,
    )


def _workload(request: ProblemRequest, model: CostModel) -> WorkloadDistribution:
    if isinstance(request.workload, WorkloadDistribution):
        return request.workload
    return WorkloadDistribution.parse(
        request.workload,
        max_context_tokens=model.shape.max_context_tokens,
        length_scale=request.length_scale,
    )


def _restricted(loaded: LoadedCostModel, request: ProblemRequest) -> CostModel:
    """The calibrated cost model offering only the TP degrees the request allows."""
    for tp_degree in request.tp_degrees:
        if tp_degree < 1:
            raise ValueError(f"TP degrees must be at least 1, got {tp_degree}")
        if tp_degree > request.num_devices:
            raise ValueError(
                f"contradictory options: TP degree {tp_degree} needs {tp_degree} devices "
                f"but the number of devices is {request.num_devices}"
            )
    return calibrated_model(loaded, request.tp_degrees)


def calibrated_model(loaded: LoadedCostModel, tp_degrees: tuple[int, ...] = ()) -> CostModel:
    """The cost model as calibrated beside its profile (calibration_store.py), offering only
    `tp_degrees` (all when empty)."""
    return ScaledCostModel(
        loaded.model,
        calibration=load_calibration(loaded.calibration_path),
        tp_degrees=tp_degrees or None,
        calibration_path=loaded.calibration_path,
    )


def _memory_bytes(request: ProblemRequest, loaded: LoadedCostModel) -> int:
    if request.device_memory_bytes is not None:
        if request.device_memory_bytes <= 0:
            raise ValueError(
                f"the device memory must be positive, got {request.device_memory_bytes} bytes"
            )
        return request.device_memory_bytes
    if loaded.device_memory_bytes is None:
        raise ValueError("the profile does not record the device memory: give the device memory")
    return loaded.device_memory_bytes
