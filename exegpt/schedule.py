"""Schedule types shared by the simulator, the scheduler service and the live engine.

A `Schedule` names an allocation kind (RRA, WAA-C, WAA-M, or a baseline users run today) and
the control variables the search varies. The simulator predicts what a schedule delivers; the
engine enforces it. Variables a kind does not use keep their neutral value (1 or 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum


class ScheduleKind(StrEnum):
    RRA = "rra"  # round-robin allocation: every device holds encode and decode layers
    WAA_C = "waa-c"  # workload-aware allocation, devices split by compute time
    WAA_M = "waa-m"  # workload-aware allocation, devices split by memory
    STATIC = "static"  # baseline: static batching, FasterTransformer style
    CONTINUOUS = "continuous"  # baseline: iteration-level batching, Orca / vLLM style

    @property
    def is_baseline(self) -> bool:
        return self in (ScheduleKind.STATIC, ScheduleKind.CONTINUOUS)


SEARCHED_KINDS = (ScheduleKind.RRA, ScheduleKind.WAA_C, ScheduleKind.WAA_M)


def searched_kinds(names: Iterable[str]) -> tuple[ScheduleKind, ...]:
    """The schedule kinds to search, from their names (blanks skipped, repeats dropped).

    Raises ValueError for an unknown name or a baseline (baselines are always reported,
    never searched); an empty result is the caller's to judge.
    """
    kinds: list[ScheduleKind] = []
    for name in (name.strip() for name in names):
        if not name:
            continue
        try:
            kind = ScheduleKind(name)
        except ValueError:
            raise ValueError(f"unknown schedule kind {name!r}; use rra, waa-c or waa-m") from None
        if kind.is_baseline:
            raise ValueError(f"{name} is a baseline: it is always reported, not searched")
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


@dataclass(frozen=True)
class Schedule:
    """One point of the search space.

    encode_batch_size      B_E: queries encoded (prefilled) together
    decode_batch_size      B_D: sequences in the running decode batch (derived, not searched)
    num_decode_iterations  N_D: decode iterations between two encodings (RRA; 1 otherwise)
    num_micro_batches      B_m: decoder micro-batches (WAA; 1 otherwise)
    tp_degree              TP degree applied to `num_tp_devices` of the devices (partial TP)
    num_tp_devices         devices running tensor-parallel (0 when tp_degree == 1)
    num_encode_devices     WAA: devices that only encode (0 for RRA and the baselines)
    num_replicas           R: data-parallel replicas, each running this schedule on
                           devices / R devices (the other variables are per replica)
    """

    kind: ScheduleKind
    encode_batch_size: int
    decode_batch_size: int
    num_decode_iterations: int = 1
    num_micro_batches: int = 1
    tp_degree: int = 1
    num_tp_devices: int = 0
    num_encode_devices: int = 0
    num_replicas: int = 1

    def __post_init__(self) -> None:
        if self.encode_batch_size < 1 or self.decode_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.num_decode_iterations < 1 or self.num_micro_batches < 1:
            raise ValueError("num_decode_iterations and num_micro_batches must be at least 1")
        if self.tp_degree < 1 or self.num_tp_devices < 0 or self.num_encode_devices < 0:
            raise ValueError("tp_degree must be >= 1 and device counts >= 0")
        if self.num_replicas < 1:
            raise ValueError("num_replicas must be at least 1")
        if self.num_tp_devices % self.tp_degree:
            raise ValueError("num_tp_devices must be a multiple of tp_degree")

    def to_dict(self) -> dict[str, int | str]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Schedule:
        fields = dict(data)
        kind = ScheduleKind(str(fields.pop("kind")))
        return cls(kind=kind, **{k: int(v) for k, v in fields.items()})  # type: ignore[arg-type]

    def describe(self) -> str:
        parts = [f"{self.kind.value}", f"B_E={self.encode_batch_size}"]
        parts.append(f"B_D={self.decode_batch_size}")
        if self.kind == ScheduleKind.RRA:
            parts.append(f"N_D={self.num_decode_iterations}")
        if self.kind in (ScheduleKind.WAA_C, ScheduleKind.WAA_M):
            parts.append(f"B_m={self.num_micro_batches}")
            parts.append(f"encode_devices={self.num_encode_devices}")
        if self.tp_degree > 1:
            parts.append(f"TP={self.tp_degree}x{self.num_tp_devices // self.tp_degree}")
        if self.num_replicas > 1:
            parts.append(f"x{self.num_replicas} replicas")
        return " ".join(parts)
