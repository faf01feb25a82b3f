"""A Plan request as the core sees it, checked and turned into a PlanProblem.

Every rejection is a RequestError(INVALID_ARGUMENT) whose message says what to change;
unset fields fall back to the scheduler's configuration.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from exegpt.cost_model import CostModel
from exegpt.errors import ErrorCode, RequestError
from exegpt.schedule import ScheduleKind, searched_kinds
from services.scheduler.calibration import ScaledCostModel
from services.scheduler.config import SchedulerConfig
from services.scheduler.confine import confined_file
from services.scheduler.problem import PlanProblem, WorkloadDistribution

CostModelLoader = Callable[[str], CostModel]


@dataclass(frozen=True)
class PlanQuery:
    profile: str = ""  # empty: the configured profile
    workload: str = ""  # empty: the configured workload
    latency_bound_s: float | None = None  # None: the configured bound
    no_latency_bound: bool = False
    num_devices: int | None = None
    device_memory_bytes: int | None = None
    kinds: tuple[str, ...] = ()
    tp_degrees: tuple[int, ...] = ()
    exhaustive: bool = False
    activate: bool = False


def invalid(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_ARGUMENT, message)


def load_cost_model(spec: str, model_config: str | None = None) -> CostModel:
    """`analytic:DEVICE[:MODEL]` (the roofline model of analytic_cost.py, for tests and
    what-ifs, e.g. analytic:a40:opt-13b) or a profile file written by the profiler.
    `model_config` (a HF config.json or its directory) is the model of an `analytic:DEVICE`
    that names no model preset."""
    kind, _, value = spec.partition(":")
    if kind == "analytic":
        from services.scheduler.analytic_cost import analytic_cost_model

        _, _, preset = value.partition(":")
        return analytic_cost_model(value, None if preset else model_config)
    from exegpt.profile.layer_profile import load_profile

    return load_profile(spec)


def configured_loader(config: SchedulerConfig) -> CostModelLoader:
    """load_cost_model with the scheduler's --model-config."""
    if config.model_config is None:
        return load_cost_model
    return lambda spec: load_cost_model(spec, config.model_config)


class CostModelCache:
    """Loaded profiles by spec, least recently used dropped first."""

    def __init__(self, loader: CostModelLoader, capacity: int = 8) -> None:
        self._loader = loader
        self._capacity = capacity
        self._models: OrderedDict[str, CostModel] = OrderedDict()

    def get(self, spec: str) -> CostModel:
        if spec in self._models:
            self._models.move_to_end(spec)
            return self._models[spec]
        try:
            model = self._loader(spec)
        except (ValueError, OSError, KeyError) as exc:
            raise invalid(f"cannot load profile {spec!r}: {exc}") from exc
        self._models[spec] = model
        if len(self._models) > self._capacity:
            self._models.popitem(last=False)
        return model


def resolve_latency_bound_s(query: PlanQuery, config: SchedulerConfig) -> float:
    if query.no_latency_bound and query.latency_bound_s is not None:
        raise invalid("contradictory options: latency_bound_s is set and no_latency_bound too")
    if query.no_latency_bound:
        return math.inf
    bound_s = config.latency_bound_s if query.latency_bound_s is None else query.latency_bound_s
    if not bound_s > 0:
        raise invalid(
            f"latency_bound_s must be positive, got {bound_s} (set no_latency_bound for none)"
        )
    return bound_s


def resolve_kinds(query: PlanQuery, config: SchedulerConfig) -> tuple[ScheduleKind, ...]:
    try:
        return searched_kinds(query.kinds) or config.kinds
    except ValueError as exc:
        raise invalid(str(exc)) from None


def resolve_device_counts(query: PlanQuery, config: SchedulerConfig) -> tuple[int, int]:
    num_devices = config.num_devices if query.num_devices is None else query.num_devices
    memory_bytes = (
        config.device_memory_bytes
        if query.device_memory_bytes is None
        else query.device_memory_bytes
    )
    if num_devices < 1:
        raise invalid(f"num_devices must be at least 1, got {num_devices}")
    if memory_bytes <= 0:
        raise invalid(f"device_memory_bytes must be positive, got {memory_bytes}")
    for tp_degree in query.tp_degrees:
        if tp_degree < 1:
            raise invalid(f"TP degrees must be at least 1, got {tp_degree}")
        if tp_degree > num_devices:
            raise invalid(
                f"contradictory options: TP degree {tp_degree} needs {tp_degree} devices "
                f"but num_devices is {num_devices}"
            )
    return num_devices, memory_bytes


def resolve_profile(query: PlanQuery, config: SchedulerConfig) -> str:
    """The profile to plan with; a file a request names must be under --profile-dir."""
    if not query.profile:
        if not config.profile:
            raise invalid(
                "no profile: name one in the request or start the scheduler with --profile"
            )
        return config.profile
    if query.profile.startswith("analytic:"):
        return query.profile
    path = confined_file(
        query.profile, config.profile_dirs, config.max_file_bytes, "profile", "--profile-dir"
    )
    return str(path)


def resolve_workload(query: PlanQuery, config: SchedulerConfig) -> str:
    """The workload spec; a trace a request names must be under --trace-dir."""
    kind, _, value = query.workload.partition(":")
    if kind != "trace" or not value:
        return query.workload or config.workload
    path = confined_file(value, config.trace_dirs, config.max_file_bytes, "trace", "--trace-dir")
    return f"trace:{path}"


def build_problem(
    query: PlanQuery, config: SchedulerConfig, cost_models: CostModelCache
) -> PlanProblem:
    """Check `query` against the configuration and the profile; load what it names."""
    latency_bound_s = resolve_latency_bound_s(query, config)
    kinds = resolve_kinds(query, config)
    num_devices, memory_bytes = resolve_device_counts(query, config)
    profile = resolve_profile(query, config)
    base = cost_models.get(profile)
    try:
        cost_model = ScaledCostModel(base, tp_degrees=query.tp_degrees or None)
    except ValueError as exc:
        raise invalid(f"profile {profile!r}: {exc}") from exc
    spec = resolve_workload(query, config)
    try:
        workload = WorkloadDistribution.parse(
            spec, max_context_tokens=base.shape.max_context_tokens
        )
        return PlanProblem(
            cost_model=cost_model,
            workload=workload,
            latency_bound_s=latency_bound_s,
            num_devices=num_devices,
            device_memory_bytes=memory_bytes,
            kinds=kinds,
        )
    except ValueError as exc:
        raise invalid(str(exc)) from exc
