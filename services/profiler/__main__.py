"""Run the profiler service: `python -m services.profiler` or `exegpt profiler`."""

from __future__ import annotations

import argparse
import logging
import sys

from exegpt.command_line import command_main
from exegpt.security import add_security_arguments, security_from_args
from exegpt.serving import run_service, wait_for_shutdown_signal, write_ready_file
from services.profiler.config import ProfilerConfig

DESCRIPTION = "run the profiler service (measures per-layer costs, stores profiles)"
logger = logging.getLogger("exegpt.profiler")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProfilerConfig()
    parser.add_argument("--host", default=defaults.host, help="interface to bind")
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument(
        "--profile-dir",
        default=defaults.profile_dir,
        help="directory holding the profiles (<profile_id>.json); created if missing",
    )
    parser.add_argument(
        "--model-root",
        action="append",
        default=[],
        help="a directory under which requests may name checkpoints to profile (repeatable; "
        "without any, only the embedded default model)",
    )
    parser.add_argument(
        "--max-queued-per-device",
        type=int,
        default=defaults.max_queued_per_device,
        help="runs that may wait for a busy device; more get RESOURCE_EXHAUSTED "
        "(0: refuse at once)",
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=defaults.max_message_bytes / 2**20,
        help="largest gRPC message in MiB (GetProfile answers carry a whole profile)",
    )
    add_security_arguments(parser)
    parser.add_argument("--ready-file", default=None, help="write host:port here once serving")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> ProfilerConfig:
    if not args.max_message_mb > 0:
        raise ValueError(f"--max-message-mb must be positive, got {args.max_message_mb}")
    return ProfilerConfig(
        host=args.host,
        port=args.port,
        profile_dir=args.profile_dir,
        model_roots=tuple(args.model_root),
        max_queued_per_device=args.max_queued_per_device,
        max_message_bytes=int(args.max_message_mb * 2**20),
        ready_file=args.ready_file,
        security=security_from_args(args),
    )


async def serve(config: ProfilerConfig) -> None:
    from services.profiler.server import start_profiler

    profiler = await start_profiler(config)
    write_ready_file(config.ready_file, profiler.address)
    await wait_for_shutdown_signal()
    logger.info("shutting down profiler on %s", profiler.address)
    await profiler.stop(config.grace_period_s)


def run(args: argparse.Namespace) -> int:
    return run_service("profiler", lambda: serve(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(command_main("python -m services.profiler", DESCRIPTION, add_arguments, run))
