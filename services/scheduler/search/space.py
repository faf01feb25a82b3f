"""The space XScheduler searches: grids, per-kind sub-spaces, memoised evaluations.

See plan.py for what the axes are and why some are enumerated rather than bisected.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.problem import PlanProblem, Prediction
from services.scheduler.simulator import waa
from services.scheduler.simulator.predict import Simulator

Index = tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Limits of the grid both search modes cover."""

    max_encode_batch_size: int = 1024
    max_running_batch_size: int = 4096  # baselines
    max_decode_iterations: int | None = None  # None: the maximum output length
    max_micro_batches: int = 8
    dense_until: int = 16
    growth: float = 1.1
    # Axes (1: N_D or B_m, 2: TP groups) that are enumerated instead of bisected: (RRA, WAA).
    enumerated_axes: tuple[tuple[int, ...], tuple[int, ...]] = ((2,), (1, 2))

    def __post_init__(self) -> None:
        if min(self.max_encode_batch_size, self.max_running_batch_size) < 1:
            raise ValueError("batch size limits must be at least 1")
        if self.max_micro_batches < 1 or self.dense_until < 1 or not self.growth > 1:
            raise ValueError("max_micro_batches, dense_until >= 1 and growth > 1 required")

    def axis(self, max_value: int, min_value: int = 1) -> tuple[int, ...]:
        """Every integer to `dense_until`, then geometric steps, ending at `max_value`."""
        values: list[int] = []
        value = min_value
        while value < max_value:
            values.append(value)
            value = (
                value + 1
                if value < self.dense_until
                else max(value + 1, round(value * self.growth))
            )
        values.append(max_value)
        return tuple(values)


@dataclass(frozen=True)
class SubSpace:
    """One kind at one replica count, TP degree (and WAA split): a box of three axes."""

    kind: ScheduleKind
    tp_degree: int
    num_encode_devices: int
    axes: tuple[tuple[int, ...], ...]  # (B_E, N_D or B_m, number of TP groups)
    num_replicas: int = 1  # data-parallel replicas, each on N / R devices

    def schedule(self, index: Index) -> Schedule:
        encode_batch, second, groups = (axis[i] for axis, i in zip(self.axes, index, strict=True))
        tp_degree = self.tp_degree if groups else 1
        if self.kind == ScheduleKind.RRA:
            return Schedule(
                self.kind,
                encode_batch,
                1,
                num_decode_iterations=second,
                tp_degree=tp_degree,
                num_tp_devices=groups * self.tp_degree,
                num_replicas=self.num_replicas,
            )
        return Schedule(
            self.kind,
            encode_batch,
            1,
            num_micro_batches=second,
            tp_degree=tp_degree,
            num_tp_devices=groups * self.tp_degree,
            num_encode_devices=self.num_encode_devices,
            num_replicas=self.num_replicas,
        )

    @property
    def top(self) -> Index:
        return tuple(len(axis) - 1 for axis in self.axes)

    def points(self) -> Iterator[Index]:
        return itertools.product(*(range(len(axis)) for axis in self.axes))


class Evaluator:
    """Memoised simulator calls; counts distinct evaluations (WAA-C and WAA-M share points)."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self._cache: dict[Schedule, Prediction] = {}
        self.evaluated: dict[Schedule, Prediction] = {}

    @property
    def num_evaluations(self) -> int:
        return len(self._cache)

    def __call__(self, schedule: Schedule) -> Prediction:
        key = (
            replace(schedule, kind=ScheduleKind.WAA_C)
            if schedule.kind == ScheduleKind.WAA_M
            else schedule
        )
        prediction = self._cache.get(key)
        if prediction is None:
            prediction = self.simulator.simulate(key)
            self._cache[key] = prediction
        if key.kind != schedule.kind:
            prediction = replace(
                prediction, schedule=replace(prediction.schedule, kind=schedule.kind)
            )
        self.evaluated.setdefault(schedule, prediction)
        return prediction


def fits_memory(prediction: Prediction, capacity_bytes: int) -> bool:
    return max(prediction.memory_bytes_per_device) <= capacity_bytes


def better(candidate: Prediction, incumbent: Prediction | None) -> bool:
    if incumbent is None:
        return True
    if not math.isclose(candidate.throughput_seq_s, incumbent.throughput_seq_s, rel_tol=1e-9):
        return candidate.throughput_seq_s > incumbent.throughput_seq_s
    return candidate.latency_s < incumbent.latency_s  # the same throughput but for rounding


def same_latency(a: Prediction, b: Prediction) -> bool:
    """Latencies equal but for float rounding (two schedules' sums of the same steps)."""
    return math.isclose(a.latency_s, b.latency_s, rel_tol=1e-9)


def faster(candidate: Prediction, incumbent: Prediction | None) -> bool:
    """Lower latency, and at the same latency higher throughput (`better`'s mirror)."""
    if incumbent is None:
        return True
    if not same_latency(candidate, incumbent):
        return candidate.latency_s < incumbent.latency_s
    return candidate.throughput_seq_s > incumbent.throughput_seq_s


def replica_counts(
    num_devices: int,
    kind: ScheduleKind | None = None,
    allowed: tuple[int, ...] | None = None,
) -> list[int]:
    """Data-parallel replica counts R on `num_devices`: the divisors of N (those `allowed`,
    when given), each replica on N / R devices (WAA needs at least 2 per replica: some
    encode, the others decode)."""
    smallest = 2 if kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M) else 1
    return [
        r
        for r in range(1, num_devices + 1)
        if not num_devices % r
        and num_devices // r >= smallest
        and (allowed is None or r in allowed)
    ]


def sub_spaces(
    problem: PlanProblem,
    kind: ScheduleKind,
    simulator: Simulator,
    space: SearchSpace,
    evaluate: Evaluator,
) -> list[SubSpace]:
    """Every (replica count, TP degree, split) sub-space of a kind, B_E trimmed to what can
    fit: a replica count R searches the same kind on N / R devices, R times over."""
    result = []
    for count in replica_counts(problem.num_devices, kind, problem.replicas):
        per_replica = replace(problem, num_devices=problem.num_devices // count, replicas=None)
        for sub in _replica_sub_spaces(per_replica, kind, simulator, space):
            sub = replace(sub, num_replicas=count)
            trimmed = _trim_encode_axis(sub, evaluate, problem.device_memory_bytes)
            if trimmed is not None:
                result.extend(_slices(trimmed, space.enumerated_axes[kind != ScheduleKind.RRA]))
    return result


def _replica_sub_spaces(
    problem: PlanProblem, kind: ScheduleKind, simulator: Simulator, space: SearchSpace
) -> list[SubSpace]:
    """The untrimmed (TP degree, split) sub-spaces of a kind on one replica's devices."""
    num_devices = problem.num_devices
    stats = simulator.stats
    if kind == ScheduleKind.RRA:
        max_iterations = space.max_decode_iterations or stats.max_output_tokens
        splits = [(0, space.axis(max(1, min(max_iterations, stats.max_output_tokens))))]
    else:
        micro = tuple(range(1, space.max_micro_batches + 1))
        candidates = waa.split_candidates(
            simulator.costs, kind, num_devices, problem.device_memory_bytes
        )
        splits = [(n, micro) for n in candidates]
    shape = problem.cost_model.shape
    result = []
    for num_encode, second_axis in splits:
        room = num_devices - num_encode
        if num_encode > shape.num_encode_layers:
            continue  # an encode device would hold no layer
        # Pipeline stages beyond the layers leave a device idle: not this allocation.
        max_stages = shape.num_decode_layers
        if kind == ScheduleKind.RRA and shape.is_encoder_decoder:
            max_stages = max(shape.num_encode_layers, shape.num_decode_layers)
        for tp in [1] + [t for t in problem.cost_model.tp_degrees if 1 < t <= room]:
            groups = tuple(
                g
                for g in (range(room // tp + 1) if tp > 1 else (0,))
                if g + room - g * tp <= max_stages
            )
            if not groups:
                continue
            axes = (space.axis(space.max_encode_batch_size), second_axis, groups)
            result.append(SubSpace(kind, tp, num_encode, axes))
    return result


def _slices(sub: SubSpace, enumerated: tuple[int, ...]) -> list[SubSpace]:
    """The sub-space cut into one slice per value of each enumerated axis."""
    choices = [
        [(v,) for v in axis] if i in enumerated else [axis] for i, axis in enumerate(sub.axes)
    ]
    return [replace(sub, axes=tuple(axes)) for axes in itertools.product(*choices)]


def _trim_encode_axis(sub: SubSpace, evaluate: Evaluator, capacity_bytes: int) -> SubSpace | None:
    """Cut B_E where no corner of the other axes fits any more (memory grows with B_E)."""
    _, second_top, groups_top = sub.top
    # Least memory: RRA at the largest N_D (smallest B_D); WAA memory ignores B_m.
    second = second_top if sub.kind == ScheduleKind.RRA else 0

    def fits(i: int) -> bool:
        corners = ((i, second, g) for g in {0, groups_top})
        return any(fits_memory(evaluate(sub.schedule(index)), capacity_bytes) for index in corners)

    if not fits(0):
        return None
    lo, hi = 0, len(sub.axes[0]) - 1
    while lo < hi:  # largest index that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return replace(sub, axes=(sub.axes[0][: lo + 1], *sub.axes[1:]))
