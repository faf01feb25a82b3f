"""Run one worker replica: `python -m services.worker --port 50061` or `exegpt worker`."""

from __future__ import annotations

import argparse
import logging
import sys

from exegpt.cli import service_main
from exegpt.serving import run_service, wait_for_shutdown_signal, write_ready_file
from services.worker.config import BatchingMode, EngineConfig, WorkerConfig

DESCRIPTION = "run one worker replica (engine + model)"
logger = logging.getLogger("exegpt.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorkerConfig()
    engine = EngineConfig()
    parser.add_argument("--model", default=defaults.model, help="model name or HF directory")
    parser.add_argument("--host", default=defaults.host, help="interface to bind")
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument("--torch-threads", type=int, default=None, help="intra-op threads")
    parser.add_argument(
        "--batching",
        choices=[m.value for m in BatchingMode],
        default=engine.batching.value,
        help="iteration-level (continuous) or whole-batch (static) batching",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=engine.max_batch_size, help="running sequences"
    )
    parser.add_argument(
        "--max-queue-size",
        type=int,
        default=engine.max_queue_size,
        help="waiting requests; more get RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=float,
        default=engine.kv_capacity_bytes / 2**20,
        help="KV cache capacity in MiB",
    )
    parser.add_argument(
        "--kv-block-size", type=int, default=engine.kv_block_size_tokens, help="tokens per block"
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=defaults.max_message_bytes / 2**20,
        help="gRPC message size limit",
    )
    parser.add_argument("--ready-file", default=None, help="write host:port here once serving")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        torch_threads=args.torch_threads,
        max_message_bytes=int(args.max_message_mb * 2**20),
        ready_file=args.ready_file,
        engine=EngineConfig(
            batching=BatchingMode(args.batching),
            max_batch_size=args.max_batch_size,
            max_queue_size=args.max_queue_size,
            kv_capacity_bytes=int(args.kv_cache_mb * 2**20),
            kv_block_size_tokens=args.kv_block_size,
        ),
    )


async def serve(config: WorkerConfig) -> None:
    import torch

    from exegpt.allocator import configure_allocator
    from exegpt.models.loader import load_model
    from services.worker.server import start_worker

    # The same malloc thresholds the profiler measures under, so its profile describes us.
    allocator = configure_allocator()
    if allocator:
        logger.info("malloc: %s", allocator)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    loaded = load_model(config.model, device=config.device)
    worker = await start_worker(config, loaded)
    write_ready_file(config.ready_file, worker.address)
    await wait_for_shutdown_signal()
    logger.info("shutting down worker on %s", worker.address)
    await worker.stop(config.grace_period_s)


def run(args: argparse.Namespace) -> int:
    return run_service("worker", lambda: serve(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(service_main("python -m services.worker", DESCRIPTION, add_arguments, run))
