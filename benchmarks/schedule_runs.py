"""The deployments benchmarks/schedules.py measures, and how many requests each one gets.

Every burst is sized in running batches per worker replica by the one rule of
exegpt/bench/burst.py (B_D is ONE replica's batch: a burst that fills each replica once
measures a fill and a drain, not the schedule). Every deployment
serves a warm-up burst before its measured one (first forwards, pools filling), so the
planned schedule and both baselines are measured alike.

The planned schedule's deployment, when calibrating, serves a calibration pass after its
warm-up: its engine clock, over the schedule's own steps at its own rows and on the machine as it is
loaded just before the measured burst, calibrates a copy of the profile by kind, and the
deployed plan's prediction is made from it (exegpt/commands/calibration_pass.py
`deployed_prediction`).
Every calibration pass is sized by the one rule of exegpt/bench/burst.py
(`plan_calibration_pass`: running batches, seconds at the predicted rate and decode steps on
every replica). On a shared machine a step's time swings with the load from one minute to the
next; this pass reads it a few seconds before the measurement it predicts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from deployments import free_port

from exegpt.bench import against_plan
from exegpt.bench.burst import (
    MAX_REQUESTS,
    measured_burst,
    plan_calibration_pass,
    running_sequences,
)
from exegpt.commands import autoplan
from exegpt.commands.calibration_pass import (
    DeployedPrediction,
    calibration_burst,
    deployed_prediction,
    engine_totals,
    sum_totals,
    totals_between,
)
from exegpt.launcher import Deployment, DeploymentConfig

if TYPE_CHECKING:
    from services.scheduler.calibration import Calibration


def running_batches(auto: autoplan.AutoPlan) -> int:
    """B_D x R: the sequences all of a plan's worker replicas run at once."""
    return running_sequences(auto.plan)


def requests_for(args: argparse.Namespace, auto: autoplan.AutoPlan) -> int:
    """A measured burst of `auto` (see `burst_size`)."""
    return burst_size(args, running_batches(auto), auto.predicted["throughput_seq_s"])


def calibration_requests(auto: autoplan.AutoPlan) -> int:
    """A calibration pass of `auto` at its predicted rate (`plan_calibration_pass`)."""
    return plan_calibration_pass(auto.plan, auto.predicted["throughput_seq_s"])


def burst_size(args: argparse.Namespace, running: int, predicted_seq_s: float) -> int:
    """`--num-requests`, or the shared rule (exegpt/bench/burst.py) for `running` sequences
    over all worker replicas at the predicted rate."""
    return args.num_requests or measured_burst(running, predicted_seq_s)


def warmup_requests(running: int) -> int:
    """A warm-up burst before a measured one: a quarter of `running` (at least 16)."""
    return min(MAX_REQUESTS, max(16, running // 4))


def on_free_ports(config: DeploymentConfig) -> DeploymentConfig:
    if config.log_dir is not None:
        config.log_dir.mkdir(parents=True, exist_ok=True)
    return replace(config, http_port=free_port(), grpc_port=free_port())


@dataclass(frozen=True)
class Burst:
    """One measured burst: the task, its size, its warm-up, and where its document goes."""

    task: str
    num_requests: int
    warmup_requests: int
    s99: int  # the workload's p99 output length (what the latency is read at)
    out: Path

    @property
    def workload(self) -> str:
        return f"task:{self.task}"


def measure(
    config: DeploymentConfig, args: argparse.Namespace, burst: Burst
) -> against_plan.Measured:
    """A warm-up, then a saturating burst, on a deployment of `config` of its own."""
    with Deployment(on_free_ports(config)) as deployment:
        warmup = burst.out.with_suffix(".warmup.json")
        against_plan.run_bench(
            deployment.http_url, burst.workload, burst.warmup_requests, warmup, args.length_scale
        )
        document = against_plan.run_bench(
            deployment.http_url, burst.workload, burst.num_requests, burst.out, args.length_scale
        )
    return against_plan.measure(document, burst.s99)


def calibrate_on(
    config: DeploymentConfig, args: argparse.Namespace, task: str, num: int, work: Path
) -> dict:
    """A warm-up and a calibration burst of `num` on a deployment of `config`; the
    calibration burst's engine-clock totals summed over the replicas."""
    work.mkdir(parents=True, exist_ok=True)
    with Deployment(on_free_ports(config)) as deployment:
        return calibration_burst(deployment, f"task:{task}", num, work, args.length_scale)


@dataclass(frozen=True)
class Calibrating:
    """What the planned deployment's own calibration pass starts from."""

    request: autoplan.PlanRequest
    profile: Path  # the uncalibrated profile
    earlier: Calibration  # the one the plan was chosen on (kinds the pass misses keep it)
    work: Path  # where the pass's bursts and the calibrated copy go
    name: str  # the calibrated copy's name


@dataclass(frozen=True)
class PlannedRun:
    """The planned schedule's measured burst and what it was predicted to do."""

    measured: against_plan.Measured
    before: DeployedPrediction  # calibrated by the pass just before the measured burst
    during: DeployedPrediction  # calibrated by the measured burst's own steps (a diagnosis)


def measure_planned(
    config: DeploymentConfig,
    args: argparse.Namespace,
    burst: Burst,
    auto: autoplan.AutoPlan,
    calibrating: Calibrating,
) -> PlannedRun:
    """The planned schedule's deployment: a calibration pass on it (warm-up included), the
    plan's prediction calibrated by that pass, then the measured burst. The engine clock over
    the measured burst itself calibrates a second prediction: with every step priced as it
    ran, what is left between it and the measurement is the simulator's own error, apart
    from the machine's load moving between the pass and the burst."""
    work, name = calibrating.work, calibrating.name
    work.mkdir(parents=True, exist_ok=True)
    with Deployment(on_free_ports(config)) as deployment:
        totals = calibration_burst(
            deployment, burst.workload, calibration_requests(auto), work, args.length_scale,
            warmup_requests=burst.warmup_requests,
        )  # fmt: skip
        start = [engine_totals(address) for address in deployment.worker_addresses]
        document = against_plan.run_bench(
            deployment.http_url, burst.workload, burst.num_requests, burst.out, args.length_scale
        )
        end = [engine_totals(address) for address in deployment.worker_addresses]
    during = sum_totals([totals_between(a, b) for a, b in zip(start, end, strict=True)])

    def predicted(totals: dict, suffix: str) -> DeployedPrediction:
        return deployed_prediction(
            auto, calibrating.request, calibrating.profile, calibrating.earlier, totals, work,
            f"{name}-{suffix}",
        )  # fmt: skip

    measured = against_plan.measure(document, burst.s99)
    return PlannedRun(measured, predicted(totals, "pass"), predicted(during, "burst"))
