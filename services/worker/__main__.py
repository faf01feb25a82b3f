"""Run one worker replica: `python -m services.worker --port 50061` or `exegpt worker`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exegpt.command_line import command_main, positive_int
from exegpt.dtypes import DTYPE_CHOICES, resolve_dtype
from exegpt.plan_file import PlanFile
from exegpt.schedule import ScheduleKind
from exegpt.security import add_security_arguments, security_from_args
from exegpt.serving import run_service, wait_for_shutdown_signal, write_ready_file
from exegpt.topology import add_topology_arguments, parse_stage_addresses, topology_from_args
from services.worker.config import (
    BATCHING_KINDS,
    EngineConfig,
    ScheduleLinkConfig,
    WorkerConfig,
)
from services.worker.policies import ENGINE_POLICIES, EnginePolicy, PolicyConfig
from services.worker.schedule_board import PlannedPrediction

if TYPE_CHECKING:
    from exegpt.models.loader import ModelCard
    from services.worker.executor.pipeline_config import PipelineConfig
    from services.worker.schedule_link import ScheduleLink
    from services.worker.server import RunningWorker

DESCRIPTION = "run one worker replica (engine + model)"
logger = logging.getLogger("exegpt.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorkerConfig()
    engine = EngineConfig()
    parser.add_argument("--model", default=defaults.model, help="model name or HF directory")
    parser.add_argument("--host", default=defaults.host, help="interface to bind")
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=defaults.dtype,
        help="weights, activations and KV cache (auto: bfloat16 where the device computes it "
        "fast, else float32); logits and sampling stay float32",
    )
    parser.add_argument("--torch-threads", type=positive_int, default=None, help="intra-op threads")
    parser.add_argument(
        "--batching",
        choices=BATCHING_KINDS,
        default=None,
        help="continuous (iteration-level), static (whole batches), or a planned schedule's kind "
        "(rra, waa-c, waa-m; with --schedule). Default: the schedule's, else continuous",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=engine.max_batch_size, help="running sequences"
    )
    _add_policy_arguments(parser, engine.policy)
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
    parser.add_argument(
        "--schedule",
        type=Path,
        default=None,
        help="run the plan `exegpt plan --json` wrote: its schedule and, without topology "
        "flags, its placement",
    )
    parser.add_argument(
        "--stages",
        default=None,
        help="run the model on stage processes: their gRPC addresses, stages separated by "
        "commas and a stage's TP ranks by '+' (h:p+h:p,h:p); with the topology flags below",
    )
    add_topology_arguments(parser)
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=0,
        help="groups of the running batch stepping independently (0: one per stage)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        help="HOST:PORT of the scheduler service: apply every schedule it pushes "
        "(WatchSchedule) and report observed lengths and stage times to it (ReportWorkload)",
    )
    parser.add_argument(
        "--report-interval-s",
        type=float,
        default=5.0,
        help="seconds between two reports to --scheduler",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this HTTP port (0: a free one; default off: the "
        "gateway's /metrics already aggregates every worker)",
    )
    parser.add_argument(
        "--metrics-host", default=defaults.metrics_host, help="interface of --metrics-port"
    )
    add_security_arguments(parser)
    parser.add_argument("--ready-file", default=None, help="write host:port here once serving")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def _add_policy_arguments(parser: argparse.ArgumentParser, policy: PolicyConfig) -> None:
    parser.add_argument(
        "--engine-policy",
        choices=ENGINE_POLICIES,
        default=policy.name.value,
        help="who runs next and who is preempted: fcfs (arrival order, newest preempted), "
        "memory_aware (admit while the predicted peak KV fits), sjf (shortest predicted "
        "work first, aged requests first)",
    )
    parser.add_argument(
        "--length-quantile",
        type=float,
        default=policy.length_quantile,
        help="memory_aware: quantile of the observed output lengths a request is predicted "
        "to reach",
    )
    parser.add_argument(
        "--backfill",
        action="store_true",
        help="memory_aware: a request may pass one ahead that does not fit while it is "
        "predicted to finish by the time that one fits (default: strict order)",
    )
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=policy.max_wait_s,
        help="sjf: a request waiting this long goes before shorter ones (aging bound)",
    )
    parser.add_argument(
        "--max-tokens-per-step",
        type=int,
        default=None,
        help="chunked prefill: while requests decode, at most N tokens a step, their decodes "
        "first and chunks of the waiting prompts in what they leave (decoder-only models: "
        "refused for T5, whose encoder cannot take a prompt in chunks; default off)",
    )
    parser.add_argument(
        "--long-output-tokens-per-step",
        type=int,
        default=None,
        help="with --max-tokens-per-step N: up to M (> N) tokens a step while every decoding "
        "request is expected to produce at least --long-output-min-tokens tokens, whose time "
        "per output token absorbs a longer step (default off: always N)",
    )
    parser.add_argument(
        "--long-output-min-tokens",
        type=int,
        default=EngineConfig.long_output_min_tokens,
        help="the expected output length (tokens so far plus the expected rest) every decoding "
        "request needs for the --long-output-tokens-per-step budget",
    )


def policy_from_args(args: argparse.Namespace) -> PolicyConfig:
    return PolicyConfig(
        EnginePolicy(args.engine_policy),
        length_quantile=args.length_quantile,
        backfill=args.backfill,
        max_wait_s=args.max_wait_s,
    )


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    plan = PlanFile.read(args.schedule) if args.schedule else None
    batching = ScheduleKind(args.batching or (plan.schedule.kind if plan else "continuous"))
    if plan is not None and batching != plan.schedule.kind and not batching.is_baseline:
        raise ValueError(f"--batching {batching} contradicts the plan's {plan.schedule.kind}")
    stages = parse_stage_addresses(args.stages) if args.stages else None
    topology = topology_from_args(args, plan.placement if plan else None)
    if topology.is_pipelined and stages is None:
        raise ValueError("--pipeline-stages/--tensor-parallel/--placement need --stages")
    if stages is not None and [len(r) for r in stages] != topology.ranks_per_stage():
        raise ValueError(
            f"--stages gives {[len(r) for r in stages]} ranks per stage, the topology needs "
            f"{topology.ranks_per_stage()}"
        )
    micro_batches = args.micro_batches or (len(stages) if stages else 1)
    return WorkerConfig(
        stage_addresses=stages,
        topology=topology,
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        max_message_bytes=int(args.max_message_mb * 2**20),
        ready_file=args.ready_file,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        security=security_from_args(args),
        planned=PlannedPrediction.from_plan(plan) if plan else None,
        schedule_link=(
            ScheduleLinkConfig(
                args.scheduler,
                report_interval_s=args.report_interval_s,
                num_replicas=plan.num_replicas if plan else None,
            )
            if args.scheduler
            else None
        ),
        engine=EngineConfig(
            batching=batching,
            schedule=plan.schedule if plan else None,
            mean_input_tokens=plan.mean_input_tokens if plan else None,
            max_batch_size=args.max_batch_size,
            policy=policy_from_args(args),
            max_queue_size=args.max_queue_size,
            kv_capacity_bytes=int(args.kv_cache_mb * 2**20),
            kv_block_size_tokens=args.kv_block_size,
            num_micro_batches=micro_batches,
            max_tokens_per_step=args.max_tokens_per_step,
            long_output_tokens_per_step=args.long_output_tokens_per_step,
            long_output_min_tokens=args.long_output_min_tokens,
        ),
    )


async def serve(config: WorkerConfig) -> None:
    from exegpt.allocator import configure_allocator
    from exegpt.compute_threads import in_passing_thread, serial_main_thread
    from exegpt.models.loader import load_model, read_model_card
    from services.worker.server import build_pipeline_engine, start_worker

    # The same malloc thresholds the profiler measures under, so its profile describes us.
    allocator = configure_allocator()
    if allocator:
        logger.info("malloc: %s", allocator)
    # Only the engine's thread computes: the model loads on a thread that ends with the load,
    # and this one stays serial (exegpt/compute_threads.py says why).
    threads = serial_main_thread(config.torch_threads)
    # `auto` is decided for the device that runs the layers: this one, or the stages'.
    compute_device = config.device if config.stage_addresses is None else config.topology.device
    dtype = resolve_dtype(config.dtype, compute_device)
    if config.stage_addresses is None:
        loaded = await in_passing_thread(
            lambda: load_model(config.model, device=config.device, dtype=dtype), threads, "load"
        )
        worker = await start_worker(config, loaded, torch_threads=threads)
    else:
        card = read_model_card(config.model, dtype=dtype)
        pipeline = _pipeline(config, card)
        engine = await asyncio.to_thread(build_pipeline_engine, card, config.engine, pipeline)
        worker = await start_worker(config, card, engine)
    link = await _link(config, worker)
    write_ready_file(config.ready_file, worker.address)
    await wait_for_shutdown_signal()
    logger.info("shutting down worker on %s", worker.address)
    if link is not None:
        await link.stop()
    await worker.stop(config.grace_period_s)


async def _link(config: WorkerConfig, worker: RunningWorker) -> ScheduleLink | None:
    """Watch and report to the scheduler (--scheduler); serving never waits for it."""
    from services.worker.schedule_link import start_schedule_link

    if config.schedule_link is None or worker.board is None:
        return None
    return await start_schedule_link(
        config.schedule_link,
        worker.engine,
        worker.board,
        worker.loaded.config,
        replica_id=worker.address,
        security=config.security,
    )


def _pipeline(config: WorkerConfig, card: ModelCard) -> PipelineConfig:
    from exegpt.dtypes import dtype_name
    from exegpt.models.kv_cache import KVCacheSpec
    from services.worker.executor.pipeline_config import PipelineConfig

    assert config.stage_addresses is not None
    engine = config.engine
    spec = KVCacheSpec.for_model(card.config, card.dtype)
    bytes_per_block = spec.bytes_per_block(engine.kv_block_size_tokens)
    num_blocks = engine.kv_capacity_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"--kv-cache-mb holds no KV block of {bytes_per_block} bytes")
    return PipelineConfig(
        model=card.source,
        dtype=dtype_name(card.dtype),  # the stages hold weights and KV in the card's dtype
        placement=config.topology.placement(card.config),
        stage_addresses=config.stage_addresses,
        num_blocks=num_blocks,
        block_size_tokens=engine.kv_block_size_tokens,
        data_host=config.host,
        security=config.security,
    )


def run(args: argparse.Namespace) -> int:
    return run_service("worker", lambda: serve(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(command_main("python -m services.worker", DESCRIPTION, add_arguments, run))
