"""Configuration of the scheduler service (one dataclass each, built in main())."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from exegpt.headroom import DEFAULT_LATENCY_HEADROOM, check_latency_headroom
from exegpt.schedule import SEARCHED_KINDS, ScheduleKind
from exegpt.security import SecurityConfig


@dataclass(frozen=True)
class DriftThresholds:
    """When observations count as drift from the plan.

    Lengths: per dimension (input, output), the Kolmogorov-Smirnov distance D between the
    observed window and the planned distribution, i.e. the largest gap between their
    cumulative distributions. D is scale-free, works on sparse empirical histograms (where
    total variation would always be near 1) and its sampling noise is known, so drift needs
    D > `ks_threshold` (an effect size) AND D above what noise alone reaches at
    `significance`. Independently, a relative mean shift beyond `mean_shift_threshold` is
    drift. A dimension is judged only with at least `min_observations` lengths.

    Stage times: per stage kind, the median of measured / predicted over the window;
    |median - 1| > `stage_time_threshold` is drift (judged with `min_stage_observations`).
    Set a threshold to math.inf to switch that check off.
    """

    min_observations: int = 200
    ks_threshold: float = 0.15
    mean_shift_threshold: float = 0.2
    significance: float = 1e-3
    stage_time_threshold: float = 0.25
    min_stage_observations: int = 20

    def __post_init__(self) -> None:
        if self.min_observations < 1 or self.min_stage_observations < 1:
            raise ValueError("min_observations and min_stage_observations must be >= 1")
        thresholds = (self.ks_threshold, self.mean_shift_threshold, self.stage_time_threshold)
        if any(not value > 0 for value in thresholds):
            raise ValueError("drift thresholds must be positive (math.inf switches one off)")
        if not 0 < self.significance < 1:
            raise ValueError("significance must be in (0, 1)")


@dataclass(frozen=True)
class SchedulerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    # Planned at start-up and pushed as version 1 when set: a profile path or analytic:PRESET.
    profile: str | None = None
    # The served model's HF config.json (or its directory) for an analytic:DEVICE profile.
    model_config: str | None = None
    workload: str = "task:S"
    latency_bound_s: float = math.inf
    # Every plan, the drift re-plans included, is chosen against latency_bound_s x (1 - this).
    latency_headroom: float = DEFAULT_LATENCY_HEADROOM
    num_devices: int = 1
    # The data-parallel replicas R the deployment runs: every pushed schedule keeps it
    # (None: the R of the first schedule published).
    num_replicas: int | None = None
    device_memory_bytes: int = 80 * 2**30
    kinds: tuple[ScheduleKind, ...] = SEARCHED_KINDS
    drift: DriftThresholds = field(default_factory=DriftThresholds)
    # Bounded sliding windows of the most recent observations.
    length_window_size: int = 1000
    stage_window_size: int = 200
    # At most one drift re-plan per interval (measured from the last published schedule).
    replan_min_interval_s: float = 30.0
    max_subscribers: int = 64
    # WatchSchedule streams one client (peer host) may hold, so one cannot take every slot.
    max_subscribers_per_client: int = 8
    # Lengths plus stage times in one WorkloadReport; longer reports are refused.
    max_report_items: int = 8192
    # Lengths beyond this are refused (they would size the histograms).
    max_length_tokens: int = 1 << 17
    max_concurrent_plans: int = 1
    # Where files named in requests may be read from (the command line's own --profile and
    # --workload are the operator's and are not confined), and how large they may be.
    profile_dirs: tuple[Path, ...] = (Path("profiles"),)
    trace_dirs: tuple[Path, ...] = ()
    max_file_bytes: int = 64 * 2**20
    max_message_bytes: int = 4 * 2**20
    ready_file: str | None = None
    grace_period_s: float = 5.0
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if not self.latency_bound_s > 0:
            raise ValueError("latency_bound_s must be positive (math.inf: no bound)")
        check_latency_headroom(self.latency_headroom)
        if self.num_devices < 1 or self.device_memory_bytes <= 0:
            raise ValueError("num_devices and device_memory_bytes must be positive")
        if self.num_replicas is not None and (
            self.num_replicas < 1 or self.num_devices % self.num_replicas
        ):
            raise ValueError(f"--replicas must divide the {self.num_devices} devices")
        if not self.kinds or any(kind.is_baseline for kind in self.kinds):
            raise ValueError("kinds must be a non-empty subset of rra, waa-c, waa-m")
        if self.length_window_size < self.drift.min_observations:
            raise ValueError("length_window_size must be at least drift.min_observations")
        if self.stage_window_size < self.drift.min_stage_observations:
            raise ValueError("stage_window_size must be at least drift.min_stage_observations")
        if self.replan_min_interval_s < 0:
            raise ValueError("replan_min_interval_s must be >= 0")
        limits = (
            self.max_subscribers,
            self.max_subscribers_per_client,
            self.max_report_items,
            self.max_concurrent_plans,
        )
        if min(limits) < 1 or self.max_length_tokens < 1 or self.max_file_bytes < 1:
            raise ValueError("subscriber, report, plan and length limits must be >= 1")
