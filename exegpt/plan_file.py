"""A plan as `exegpt plan --json` writes it, read back for deployment (`exegpt up --schedule`).

Only what the runner needs is read: the chosen schedule (kind, control variables and its
number of data-parallel replicas), where each replica's layers go (the placement the
simulator laid out), the workload's mean lengths (RRA keeps
each encoding's prompt tokens near B_E x the mean input) and the prediction, for reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exegpt.placement import Placement
from exegpt.schedule import Schedule

MAX_PLAN_BYTES = 4 << 20


@dataclass(frozen=True)
class PlanFile:
    schedule: Schedule
    placement: Placement | None
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    workload: str
    predicted: dict[str, Any]
    latency_bound_s: float | None = None  # None: planned without a bound
    meets_bound: bool = True

    @property
    def num_replicas(self) -> int:
        """Data-parallel replicas the plan runs, each at `placement` (its prediction is for
        all of them together)."""
        return self.schedule.num_replicas

    def num_workers(self, copies: int) -> int:
        """Worker replicas of `copies` copies of the plan (`exegpt up --replicas`), each
        running the plan's R data-parallel replicas."""
        return copies * self.num_replicas

    @classmethod
    def read(cls, path: Path) -> PlanFile:
        if not path.is_file() or path.stat().st_size > MAX_PLAN_BYTES:
            raise ValueError(f"plan {path} is not a regular file of at most 4 MiB")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"plan {path} is not JSON: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> PlanFile:
        if not isinstance(data, dict) or not isinstance(data.get("schedule"), dict):
            raise ValueError(f"{where} has no chosen schedule (did the plan meet no bound?)")
        try:
            schedule = Schedule.from_dict(data["schedule"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad schedule: {exc}") from None
        placement = data.get("placement")
        return cls(
            schedule=schedule,
            placement=Placement.from_dict(placement) if placement else None,
            mean_input_tokens=_number(data.get("mean_input_tokens")),
            mean_output_tokens=_number(data.get("mean_output_tokens")),
            workload=str(data.get("workload", "")),
            predicted=data.get("predicted") or {},
            latency_bound_s=_number(data.get("latency_bound_s")),
            meets_bound=data.get("meets_bound") is not False,
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None
