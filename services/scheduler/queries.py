"""A Plan request as the core sees it, completed from the configuration and turned into a
PlanProblem by the one problem builder (problem_builder.py).

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
from services.scheduler import problem_builder
from services.scheduler.calibration_store import calibration_path
from services.scheduler.config import SchedulerConfig
from services.scheduler.confine import confined_file
from services.scheduler.problem import PlanProblem
from services.scheduler.problem_builder import (
    ANALYTIC_PREFIX,
    LoadedCostModel,
    ProblemRequest,
    load_cost_model,
)

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


def configured_loader(config: SchedulerConfig) -> CostModelLoader:
    """The problem builder's loader, with the scheduler's --model-config as the model of an
    `analytic:DEVICE` that names no model preset."""

    def load(spec: str) -> CostModel:
        _, _, preset = spec.removeprefix(ANALYTIC_PREFIX).partition(":")
        names_device_only = spec.startswith(ANALYTIC_PREFIX) and not preset
        model_config = config.model_config if names_device_only else None
        return load_cost_model(spec, model_config).model

    return load


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
    return config.latency_bound_s if query.latency_bound_s is None else query.latency_bound_s


def resolve_kinds(query: PlanQuery, config: SchedulerConfig) -> tuple[ScheduleKind, ...]:
    try:
        return searched_kinds(query.kinds) or config.kinds
    except ValueError as exc:
        raise invalid(str(exc)) from None


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
    """Fill `query`'s unset fields from the configuration, load the profile it names and
    build the problem with the scheduler's one problem builder."""
    request = ProblemRequest(
        workload=resolve_workload(query, config),
        latency_bound_s=resolve_latency_bound_s(query, config),
        num_devices=config.num_devices if query.num_devices is None else query.num_devices,
        device_memory_bytes=(
            config.device_memory_bytes
            if query.device_memory_bytes is None
            else query.device_memory_bytes
        ),
        kinds=resolve_kinds(query, config),
        tp_degrees=query.tp_degrees,
        latency_headroom=config.latency_headroom,
    )
    profile = resolve_profile(query, config)
    loaded = LoadedCostModel(cost_models.get(profile), profile, None, calibration_path(profile))
    try:
        return problem_builder.build_problem(request, loaded)
    except ValueError as exc:
        raise invalid(str(exc)) from exc
