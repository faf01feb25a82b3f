"""Run one pipeline stage process: `python -m services.worker.stage --port 50071`.

It starts empty; the engine's PipelineExecutor tells it over gRPC which layers to load and
where to send their output.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from exegpt.command_line import command_main, positive_int
from exegpt.security import SecurityConfig, add_security_arguments, security_from_args
from exegpt.serving import run_service, start_grpc_server, write_ready_file

DESCRIPTION = "run one pipeline stage (a layer range, one TP rank) of a replica"
logger = logging.getLogger("exegpt.stage")


@dataclass(frozen=True)
class StageConfig:
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    torch_threads: int | None = None
    model_roots: tuple[Path, ...] = ()
    ready_file: str | None = None
    max_message_bytes: int = 4 * 2**20
    security: SecurityConfig = field(default_factory=SecurityConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StageConfig()
    parser.add_argument("--host", default=defaults.host, help="interface to bind (gRPC and data)")
    parser.add_argument("--port", type=int, default=defaults.port, help="gRPC; 0 picks one")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument("--torch-threads", type=positive_int, default=None, help="intra-op threads")
    parser.add_argument(
        "--model-root",
        type=Path,
        action="append",
        default=[],
        help="directory whose checkpoints may be loaded (repeatable; the embedded model always)",
    )
    add_security_arguments(parser)
    parser.add_argument("--ready-file", default=None, help="write host:port here once serving")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> StageConfig:
    return StageConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        torch_threads=args.torch_threads,
        model_roots=tuple(args.model_root),
        ready_file=args.ready_file,
        security=security_from_args(args),
    )


async def serve(config: StageConfig) -> None:
    from exegpt.allocator import configure_allocator
    from exegpt.compute_threads import serial_main_thread
    from exegpt.serving import wait_for_shutdown_signal
    from exegpt.v1 import stage_pb2_grpc
    from services.worker.stage.runtime import StageRuntime
    from services.worker.stage.server import StageServicer

    # Only the stage loop computes: this thread stays serial (exegpt/compute_threads.py).
    threads = serial_main_thread(config.torch_threads)
    configure_allocator()
    runtime = StageRuntime(config.host, config.device, config.model_roots)
    runtime.start(threads)
    stop = asyncio.Event()
    servicer = StageServicer(runtime, config.host, stop)
    server = await start_grpc_server(
        lambda s: stage_pb2_grpc.add_StageServicer_to_server(servicer, s),
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        security=config.security,
    )
    write_ready_file(config.ready_file, server.address)
    logger.info("stage on %s, data %s", server.address, runtime.data_address)
    signal_wait = asyncio.ensure_future(wait_for_shutdown_signal())
    await asyncio.wait(
        [signal_wait, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED"
    )
    await server.stop(1.0)
    await asyncio.to_thread(runtime.stop)


def run(args: argparse.Namespace) -> int:
    return run_service("stage", lambda: serve(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(command_main("python -m services.worker.stage", DESCRIPTION, add_arguments, run))
