"""The serving path's host work beside the forwards: what a step costs beyond its model call.

A profile's layer timings price the forwards alone. Serving a request also costs host time
on the replica: planning the step and building its batch, sampling, applying the result,
detokenizing each new token and streaming it over gRPC and HTTP (and, on a shared machine,
the router and the clients competing for the same cores). The engine accounts each step's
wall time against the time inside its forward (services/worker/engine_clock.py); the
profiler fits what is left to three terms (services/profiler/serving.py) and stores them in
the profile's `serving` section; the simulator adds them to every step it models:

    host_s(step) = step_s + token_s x rows + request_s x new requests

`token_s` is paid by every row of a step (each produces one token); `request_s` by each
request a prefill step admits (its prompt, its stream's setup and end). A cost model that
has these exposes them as `serving_overhead`; one without them costs nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ServingOverhead:
    """Host seconds of the serving path, per engine step, per token and per request."""

    step_s: float = 0.0
    token_s: float = 0.0
    request_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("step_s", "token_s", "request_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"serving overhead {name} must be finite and >= 0, got {value}")

    def scaled(self, factor: float) -> ServingOverhead:
        """Every term times `factor` (a calibration's correction)."""
        if factor == 1.0:
            return self
        return ServingOverhead(self.step_s * factor, self.token_s * factor, self.request_s * factor)

    def decode_step_s(self, num_rows: float) -> float:
        """Host time of a decode step of `num_rows` sequences."""
        return self.step_s + self.token_s * num_rows

    def prefill_step_s(self, num_requests: float) -> float:
        """Host time of a prefill step admitting `num_requests` (each gets its first token)."""
        return self.step_s + (self.token_s + self.request_s) * num_requests

    @property
    def is_zero(self) -> bool:
        return self.step_s == self.token_s == self.request_s == 0.0


NO_OVERHEAD = ServingOverhead()


def serving_overhead_of(cost_model: object) -> ServingOverhead:
    """The overhead a cost model carries (`serving_overhead`), looking through views that
    wrap another model (`base`); none when no model in the chain has one."""
    seen = 0
    while cost_model is not None and seen < 8:
        overhead = getattr(cost_model, "serving_overhead", None)
        if isinstance(overhead, ServingOverhead):
            return overhead
        cost_model = getattr(cost_model, "base", None)
        seen += 1
    return NO_OVERHEAD


@dataclass(frozen=True)
class StepSample:
    """One run's totals of one step kind: steps, rows, requests admitted, host seconds."""

    num_steps: int
    num_rows: int
    num_requests: int
    host_s: float


def fit_overhead(samples: Sequence[StepSample]) -> ServingOverhead:
    """Least squares of host_s = steps x step_s + rows x token_s + requests x request_s over
    the samples, each weighted by its number of steps; terms the data cannot support (a
    negative estimate) are dropped and the rest refitted, so every term is >= 0."""
    used = [s for s in samples if s.num_steps > 0]
    if not used:
        raise ValueError("no engine steps to fit the serving overhead to")
    design = np.array([[s.num_steps, s.num_rows, s.num_requests] for s in used], dtype=np.float64)
    target = np.array([s.host_s for s in used], dtype=np.float64)
    weight = 1.0 / np.sqrt([s.num_steps for s in used])  # per-step residuals weigh alike
    active = [0, 1, 2]
    while active:
        solution, *_ = np.linalg.lstsq(
            design[:, active] * weight[:, None], target * weight, rcond=None
        )
        if (solution >= 0).all():
            values = dict(zip(active, solution.tolist(), strict=True))
            return ServingOverhead(values.get(0, 0.0), values.get(1, 0.0), values.get(2, 0.0))
        active.pop(int(np.argmin(solution)))
    return NO_OVERHEAD
