"""Drift detection: do recent observations still match what the current plan assumed?

Plain Python and numpy; the statistics and their thresholds are described in
config.DriftThresholds. The detector only judges; the service decides when to re-plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.scheduler.config import DriftThresholds
from services.scheduler.observations import LengthWindow, ObservationWindows, StageKind
from services.scheduler.problem import WorkloadDistribution


@dataclass(frozen=True)
class PlannedWorkload:
    """The distribution a plan was made for, and how many samples it was estimated from
    (None: an exact distribution such as a task's, which has no sampling noise)."""

    distribution: WorkloadDistribution
    num_input_samples: int | None = None
    num_output_samples: int | None = None


@dataclass(frozen=True)
class LengthDrift:
    num_observations: int
    ks_distance: float
    ks_noise_floor: float
    observed_mean_tokens: float
    planned_mean_tokens: float
    relative_mean_shift: float  # (observed - planned) / planned
    drifted: bool

    def describe(self, label: str) -> str:
        return (
            f"{label} lengths: KS {self.ks_distance:.3f} (noise {self.ks_noise_floor:.3f}), "
            f"mean {self.observed_mean_tokens:.1f} vs planned {self.planned_mean_tokens:.1f} "
            f"({self.relative_mean_shift:+.0%}) over {self.num_observations} requests"
        )


@dataclass(frozen=True)
class DriftVerdict:
    input: LengthDrift | None  # None: too few observations to judge
    output: LengthDrift | None
    stage_time_ratios: dict[StageKind, float]  # median measured / predicted, judged kinds only
    stage_time_counts: dict[StageKind, int]
    stage_time_drifted: bool

    @property
    def length_drifted(self) -> bool:
        return any(drift is not None and drift.drifted for drift in (self.input, self.output))

    @property
    def drifted(self) -> bool:
        return self.length_drifted or self.stage_time_drifted

    def describe(self) -> str:
        parts = [
            drift.describe(label)
            for label, drift in (("input", self.input), ("output", self.output))
            if drift is not None and drift.drifted
        ]
        if self.stage_time_drifted:
            parts += [
                f"{stage} stage time {ratio:.2f}x the prediction "
                f"over {self.stage_time_counts[stage]} batches"
                for stage, ratio in self.stage_time_ratios.items()
            ]
        return "; ".join(parts) if parts else "no drift"


def ks_distance(observed_pmf: np.ndarray, planned_pmf: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance: the largest gap between the two cumulative distributions."""
    size = max(len(observed_pmf), len(planned_pmf))
    observed_cdf = np.cumsum(np.pad(observed_pmf, (0, size - len(observed_pmf))))
    planned_cdf = np.cumsum(np.pad(planned_pmf, (0, size - len(planned_pmf))))
    return float(np.max(np.abs(observed_cdf - planned_cdf)))


def ks_noise_floor(num_observed: int, num_planned: int | None, significance: float) -> float:
    """The KS distance two samples of one distribution exceed with probability `significance`
    (asymptotic two-sample critical value; one-sample when the planned side is exact)."""
    scale = 1 / num_observed + (1 / num_planned if num_planned else 0.0)
    return math.sqrt(-math.log(significance / 2) / 2) * math.sqrt(scale)


def _mean_tokens(pmf: np.ndarray) -> float:
    return float(np.dot(np.arange(len(pmf)), pmf))


def length_drift(
    window: LengthWindow,
    planned_pmf: np.ndarray,
    num_planned_samples: int | None,
    thresholds: DriftThresholds,
) -> LengthDrift | None:
    """Judge one length dimension; None with fewer than `min_observations` lengths."""
    if len(window) < thresholds.min_observations:
        return None
    observed_pmf = window.pmf()
    distance = ks_distance(observed_pmf, planned_pmf)
    noise = ks_noise_floor(len(window), num_planned_samples, thresholds.significance)
    observed_mean = _mean_tokens(observed_pmf)
    planned_mean = _mean_tokens(planned_pmf)
    shift = (observed_mean - planned_mean) / planned_mean
    drifted = (distance > thresholds.ks_threshold and distance > noise) or (
        abs(shift) > thresholds.mean_shift_threshold
    )
    return LengthDrift(
        num_observations=len(window),
        ks_distance=distance,
        ks_noise_floor=noise,
        observed_mean_tokens=observed_mean,
        planned_mean_tokens=planned_mean,
        relative_mean_shift=shift,
        drifted=drifted,
    )


class DriftDetector:
    """Compares observation windows with the workload and cost model of the current plan."""

    def __init__(self, thresholds: DriftThresholds) -> None:
        self.thresholds = thresholds

    def evaluate(self, windows: ObservationWindows, planned: PlannedWorkload) -> DriftVerdict:
        distribution = planned.distribution
        ratios: dict[StageKind, float] = {}
        counts: dict[StageKind, int] = {}
        for stage in StageKind:
            count = len(windows.stage_ratios[stage])
            median = windows.median_ratio(stage)
            if median is not None and count >= self.thresholds.min_stage_observations:
                ratios[stage] = median
                counts[stage] = count
        stage_drifted = any(
            abs(ratio - 1) > self.thresholds.stage_time_threshold for ratio in ratios.values()
        )
        return DriftVerdict(
            input=length_drift(
                windows.inputs,
                distribution.input_pmf,
                planned.num_input_samples,
                self.thresholds,
            ),
            output=length_drift(
                windows.outputs,
                distribution.output_pmf,
                planned.num_output_samples,
                self.thresholds,
            ),
            stage_time_ratios=ratios,
            stage_time_counts=counts,
            stage_time_drifted=stage_drifted,
        )


def observed_workload(
    windows: ObservationWindows, planned: PlannedWorkload, thresholds: DriftThresholds
) -> PlannedWorkload:
    """The workload to re-plan for: each dimension's window when it holds enough lengths to
    judge, else what was planned before."""
    before = planned.distribution
    input_pmf, num_inputs = before.input_pmf, planned.num_input_samples
    output_pmf, num_outputs = before.output_pmf, planned.num_output_samples
    if len(windows.inputs) >= thresholds.min_observations:
        input_pmf, num_inputs = windows.inputs.pmf(), len(windows.inputs)
    if len(windows.outputs) >= thresholds.min_observations:
        output_pmf, num_outputs = windows.outputs.pmf(), len(windows.outputs)
    name = before.name if before.name.startswith("observed") else f"observed (was {before.name})"
    return PlannedWorkload(
        WorkloadDistribution(name, input_pmf, output_pmf), num_inputs, num_outputs
    )
