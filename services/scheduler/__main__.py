"""Run the scheduler service: `python -m services.scheduler --profile P` or `exegpt scheduler`."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from exegpt.command_line import command_main
from exegpt.errors import RequestError
from exegpt.headroom import add_headroom_argument
from exegpt.schedule import searched_kinds
from exegpt.security import add_security_arguments, security_from_args
from exegpt.serving import run_service, wait_for_shutdown_signal, write_ready_file
from services.scheduler.config import DriftThresholds, SchedulerConfig
from services.scheduler.problem import WorkloadDistribution

DESCRIPTION = "run the scheduler service (plans schedules, re-plans on workload drift)"
logger = logging.getLogger("exegpt.scheduler")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SchedulerConfig()
    drift = DriftThresholds()
    parser.add_argument("--host", default=defaults.host, help="interface to bind")
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument(
        "--profile",
        default=None,
        help="profile file or analytic:PRESET; planned at start-up and pushed to watchers",
    )
    parser.add_argument(
        "--model-config",
        default=None,
        help="HF config.json (or its directory) of the served model, for analytic:DEVICE",
    )
    parser.add_argument("--workload", default=defaults.workload, help="task:ID or trace:PATH")
    parser.add_argument(
        "--latency-bound", type=float, default=0.0, help="seconds; 0 means no bound"
    )
    add_headroom_argument(parser)
    parser.add_argument(
        "--devices", type=int, default=defaults.num_devices, help="devices the schedule spans"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="data-parallel replicas R the deployment runs; every pushed schedule keeps it "
        "(default: the R of the first schedule published)",
    )
    parser.add_argument(
        "--device-memory-gb",
        type=float,
        default=defaults.device_memory_bytes / 2**30,
        help="memory per device in GiB",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(kind.value for kind in defaults.kinds),
        help="comma-separated schedule kinds to search",
    )
    drift_flags = parser.add_argument_group("drift detection and re-planning")
    drift_flags.add_argument(
        "--min-observations",
        type=int,
        default=drift.min_observations,
        help="lengths needed before a length distribution is judged",
    )
    drift_flags.add_argument(
        "--ks-threshold",
        type=float,
        default=drift.ks_threshold,
        help="Kolmogorov-Smirnov distance (observed vs planned lengths) that counts as drift",
    )
    drift_flags.add_argument(
        "--mean-shift-threshold",
        type=float,
        default=drift.mean_shift_threshold,
        help="relative shift of the mean length that counts as drift",
    )
    drift_flags.add_argument(
        "--stage-time-threshold",
        type=float,
        default=drift.stage_time_threshold,
        help="|median measured/predicted stage time - 1| that counts as drift",
    )
    drift_flags.add_argument(
        "--min-stage-observations",
        type=int,
        default=drift.min_stage_observations,
        help="stage times needed before they are judged",
    )
    drift_flags.add_argument(
        "--length-window",
        type=int,
        default=defaults.length_window_size,
        help="most recent lengths kept per dimension",
    )
    drift_flags.add_argument(
        "--stage-window",
        type=int,
        default=defaults.stage_window_size,
        help="most recent stage times kept per stage kind",
    )
    drift_flags.add_argument(
        "--replan-min-interval",
        type=float,
        default=defaults.replan_min_interval_s,
        help="seconds: at most one drift re-plan per interval",
    )
    parser.add_argument(
        "--max-subscribers",
        type=int,
        default=defaults.max_subscribers,
        help="WatchSchedule streams served at once",
    )
    parser.add_argument(
        "--max-subscribers-per-client",
        type=int,
        default=defaults.max_subscribers_per_client,
        help="WatchSchedule streams one client host may hold; more get RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--profile-dir",
        action="append",
        type=Path,
        default=None,
        help="directory Plan requests may name profiles in (repeatable; default: profiles)",
    )
    parser.add_argument(
        "--trace-dir",
        action="append",
        type=Path,
        default=None,
        help="directory Plan requests may name trace:PATH workloads in (repeatable; "
        "default: none, so requests cannot name traces)",
    )
    parser.add_argument(
        "--max-file-mb",
        type=float,
        default=defaults.max_file_bytes / 2**20,
        help="largest profile or trace file a request may name, MiB",
    )
    add_security_arguments(parser)
    parser.add_argument("--ready-file", default=None, help="write host:port here once serving")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    if args.latency_bound < 0:
        raise ValueError("--latency-bound must be positive (0 means no bound)")
    WorkloadDistribution.parse(args.workload)  # a typo fails now, not at the first plan
    return SchedulerConfig(
        host=args.host,
        port=args.port,
        profile=args.profile,
        model_config=args.model_config,
        workload=args.workload,
        latency_bound_s=args.latency_bound or math.inf,
        latency_headroom=args.latency_headroom,
        num_devices=args.devices,
        num_replicas=args.replicas,
        device_memory_bytes=int(args.device_memory_gb * 2**30),
        kinds=searched_kinds(args.kinds.split(",")),
        drift=DriftThresholds(
            min_observations=args.min_observations,
            ks_threshold=args.ks_threshold,
            mean_shift_threshold=args.mean_shift_threshold,
            stage_time_threshold=args.stage_time_threshold,
            min_stage_observations=args.min_stage_observations,
        ),
        length_window_size=args.length_window,
        stage_window_size=args.stage_window,
        replan_min_interval_s=args.replan_min_interval,
        max_subscribers=args.max_subscribers,
        max_subscribers_per_client=args.max_subscribers_per_client,
        profile_dirs=tuple(args.profile_dir or SchedulerConfig().profile_dirs),
        trace_dirs=tuple(args.trace_dir or ()),
        max_file_bytes=int(args.max_file_mb * 2**20),
        ready_file=args.ready_file,
        security=security_from_args(args),
    )


async def serve(config: SchedulerConfig) -> None:
    from services.scheduler.server import start_scheduler

    scheduler = await start_scheduler(config)
    write_ready_file(config.ready_file, scheduler.address)
    await wait_for_shutdown_signal()
    logger.info("shutting down scheduler on %s", scheduler.address)
    await scheduler.stop(config.grace_period_s)


def run(args: argparse.Namespace) -> int:
    return run_service(
        "scheduler",
        lambda: serve(config_from_args(args)),
        errors=(ValueError, OSError, RequestError),
    )


if __name__ == "__main__":
    sys.exit(command_main("python -m services.scheduler", DESCRIPTION, add_arguments, run))
