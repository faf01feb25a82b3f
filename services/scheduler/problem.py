"""What a planning question and its answer look like (plain Python, no grpc).

The search (`search/plan.py`) takes a `PlanProblem` and returns a `PlanResult`; the CLI and the
gRPC service only translate to and from these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exegpt.cost_model import CostModel
from exegpt.headroom import check_latency_headroom, planning_bound_s
from exegpt.schedule import SEARCHED_KINDS, Schedule, ScheduleKind
from exegpt.workloads import get_task, load_trace, scale_length


@dataclass(frozen=True)
class WorkloadDistribution:
    """P_E(S) and P_D(S): probability arrays indexed by length in tokens (index 0 unused)."""

    name: str
    input_pmf: np.ndarray
    output_pmf: np.ndarray
    # The paper's tasks state their p99 output length; it wins over the pmf's quantile.
    declared_output_p99_tokens: int | None = None

    def __post_init__(self) -> None:
        for label, pmf in (("input", self.input_pmf), ("output", self.output_pmf)):
            if pmf.ndim != 1 or len(pmf) < 2 or np.any(pmf < 0) or not np.isclose(pmf.sum(), 1):
                raise ValueError(f"{label} length distribution must be a 1-D pmf summing to 1")
            if pmf[0] > 0:
                raise ValueError(f"{label} length distribution gives mass to length 0")

    @classmethod
    def from_task(cls, task_id: str) -> WorkloadDistribution:
        task = get_task(task_id)
        return cls(
            f"task:{task.task_id}", task.input.pmf(), task.output.pmf(), task.output_p99_tokens
        )

    @classmethod
    def from_scaled_task(cls, task_id: str, length_scale: float) -> WorkloadDistribution:
        """A task with every length scaled as `exegpt bench --length-scale` draws it
        (exegpt/workloads.py `scale_length`)."""
        task = cls.from_task(task_id)
        if length_scale == 1.0:
            return task

        def scale(pmf: np.ndarray) -> np.ndarray:
            lengths = [scale_length(n, length_scale, None) for n in range(1, len(pmf))]
            scaled = np.zeros(max(lengths) + 1)
            np.add.at(scaled, lengths, pmf[1:])
            return scaled

        p99 = task.declared_output_p99_tokens
        return cls(
            f"{task.name} (lengths x{length_scale:g})",
            scale(task.input_pmf),
            scale(task.output_pmf),
            None if p99 is None else scale_length(p99, length_scale, None),
        )

    @classmethod
    def from_lengths(
        cls, name: str, input_tokens: Sequence[int], output_tokens: Sequence[int]
    ) -> WorkloadDistribution:
        """Empirical distribution of observed (or traced) lengths."""
        if len(input_tokens) == 0 or len(output_tokens) == 0:
            raise ValueError("need at least one observed input and output length")
        inputs = np.asarray(input_tokens, dtype=np.int64)
        outputs = np.asarray(output_tokens, dtype=np.int64)
        if inputs.min() < 1 or outputs.min() < 1:
            raise ValueError("observed lengths must be at least 1 token")
        return cls(name, _histogram(inputs), _histogram(outputs))

    @classmethod
    def from_trace(
        cls, path: str, *, length_scale: float = 1.0, max_context_tokens: int | None = None
    ) -> WorkloadDistribution:
        requests = load_trace(path, length_scale=length_scale, max_input_tokens=max_context_tokens)
        scaled = "" if length_scale == 1.0 else f" (lengths x{length_scale:g})"
        return cls.from_lengths(
            f"trace:{path}{scaled}",
            [r.input_tokens for r in requests],
            [r.output_tokens for r in requests],
        )

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        max_context_tokens: int | None = None,
        length_scale: float | None = None,
    ) -> WorkloadDistribution:
        """`task:S` (any of the five tasks) or `trace:PATH`; `length_scale` multiplies a
        trace's token counts (a task's lengths are fixed by the paper)."""
        kind, _, value = spec.partition(":")
        if kind == "task" and value:
            if length_scale is not None:
                raise ValueError("a length scale applies to trace workloads, not to a task")
            return cls.from_task(value)
        if kind == "trace" and value:
            return cls.from_trace(
                value,
                length_scale=1.0 if length_scale is None else length_scale,
                max_context_tokens=max_context_tokens,
            )
        raise ValueError(f"unknown workload {spec!r}; use task:S|T|G|C1|C2 or trace:PATH")

    @property
    def mean_input_tokens(self) -> float:
        return float(np.dot(np.arange(len(self.input_pmf)), self.input_pmf))

    @property
    def mean_output_tokens(self) -> float:
        return float(np.dot(np.arange(len(self.output_pmf)), self.output_pmf))

    @property
    def max_input_tokens(self) -> int:
        return int(np.flatnonzero(self.input_pmf)[-1])

    @property
    def max_output_tokens(self) -> int:
        return int(np.flatnonzero(self.output_pmf)[-1])

    def output_quantile_tokens(self, quantile: float) -> int:
        """Smallest length S with P(output <= S) >= quantile."""
        cdf = np.cumsum(self.output_pmf)
        return int(np.searchsorted(cdf, quantile - 1e-12))

    @property
    def output_p99_tokens(self) -> int:
        """The length whose generation time defines the latency bound L_B."""
        if self.declared_output_p99_tokens is not None:
            return self.declared_output_p99_tokens
        return self.output_quantile_tokens(0.99)


def _histogram(lengths: np.ndarray) -> np.ndarray:
    counts = np.bincount(lengths).astype(np.float64)
    return counts / counts.sum()


@dataclass(frozen=True)
class PlanProblem:
    """Maximise throughput subject to latency(p99 output length) <= latency_bound_s."""

    cost_model: CostModel
    workload: WorkloadDistribution
    latency_bound_s: float  # math.inf: no bound
    num_devices: int
    device_memory_bytes: int
    kinds: tuple[ScheduleKind, ...] = SEARCHED_KINDS
    # Branch-and-bound slack for nearly-monotonic functions (search/plan.py): eps_T, relative to a
    # box's throughput bound, and eps_L, seconds over the latency bound.
    throughput_tolerance: float = 0.01
    latency_tolerance_s: float = 0.0
    # Data-parallel replica counts R searched (None: every divisor of N); a deployment that
    # is running keeps its R (the scheduler service's re-plans).
    replicas: tuple[int, ...] | None = None
    # Chosen against latency_bound_s x (1 - latency_headroom) (exegpt/headroom.py); when nothing
    # meets that but the bound itself is met, the lowest-latency schedule serves. 0 here: the
    # bound as given; the commands and the scheduler service default to
    # DEFAULT_LATENCY_HEADROOM.
    latency_headroom: float = 0.0

    def __post_init__(self) -> None:
        if not self.latency_bound_s > 0:
            raise ValueError("latency bound must be positive")
        check_latency_headroom(self.latency_headroom)
        if self.num_devices < 1:
            raise ValueError("number of devices must be at least 1")
        if self.device_memory_bytes <= 0:
            raise ValueError("device memory must be positive")
        if not self.kinds or any(kind.is_baseline for kind in self.kinds):
            raise ValueError("kinds must be a non-empty subset of rra, waa-c, waa-m")
        if self.num_devices < 2 and ScheduleKind.RRA not in self.kinds:
            raise ValueError(
                "WAA needs at least 2 devices (some encode, the others decode); "
                "on 1 device search rra"
            )
        if not (self.throughput_tolerance >= 0 and self.latency_tolerance_s >= 0):
            raise ValueError("tolerances must be non-negative")
        if self.replicas is not None and (
            not self.replicas or any(r < 1 or self.num_devices % r for r in self.replicas)
        ):
            raise ValueError(
                f"replica counts {self.replicas} must each divide the {self.num_devices} devices"
            )

    @property
    def planning_bound_s(self) -> float:
        """The bound a schedule's prediction must meet to be chosen (the headroom taken)."""
        return planning_bound_s(self.latency_bound_s, self.latency_headroom)


@dataclass(frozen=True)
class Prediction:
    """What the simulator expects a schedule to deliver at steady state."""

    schedule: Schedule
    feasible: bool  # fits in memory (and is a valid allocation on the devices)
    throughput_seq_s: float
    throughput_tokens_s: float  # generated tokens per second
    latency_s: float  # of a sequence with the p99 output length (max length: static baseline)
    memory_bytes_per_device: tuple[int, ...]
    utilisation_per_device: tuple[float, ...]
    reason: str = ""  # why infeasible


@dataclass(frozen=True)
class SearchStats:
    num_evaluations: int  # distinct simulator evaluations of the searched kinds
    wall_s: float  # the searched kinds' search
    num_baseline_evaluations: int = 0  # the baselines' 1-D searches, reported apart
    baseline_wall_s: float = 0.0


@dataclass(frozen=True)
class PlanResult:
    """The chosen schedule, the best of each kind and baseline, and what the search cost."""

    # The best predicted of any kind, baselines included (None when nothing meets the bound).
    chosen: Prediction | None
    meets_bound: bool
    best_by_kind: dict[str, Prediction]  # kind value -> best feasible point (searched + baselines)
    lowest_latency: Prediction | None  # the fastest feasible point, reported when nothing meets
    search: SearchStats
    evaluated: list[Prediction] = field(default_factory=list)  # every point, for the frontier
    # Set when no searched configuration fits in memory at all: what the smallest one needs.
    infeasible_reason: str = ""
