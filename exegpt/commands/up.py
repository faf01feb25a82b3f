"""`exegpt up`: the command line of a local deployment (exegpt/launcher.py runs it).

Its flags become one `DeploymentConfig`; `--plan` first profiles and plans
(exegpt/commands/autoplan.py), `--schedule` deploys a plan file. It prints one `exegpt ready`
line with the endpoints and keeps every child running until Ctrl-C or SIGTERM, or until one of
them crash-loops.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from exegpt.chunk_budgets import DEFAULT_LONG_OUTPUT_MIN_TOKENS
from exegpt.command_line import positive_int
from exegpt.commands import autoplan
from exegpt.dtypes import DTYPE_CHOICES
from exegpt.launcher import Deployment, DeploymentConfig, LaunchError, RestartPolicy
from exegpt.plan_file import PlanFile
from exegpt.schedule import ScheduleKind
from exegpt.security import add_security_arguments, security_from_args
from exegpt.topology import add_topology_arguments, topology_from_args

DESCRIPTION = "start the router and N worker replicas and keep them running"
logger = logging.getLogger("exegpt.launcher")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DeploymentConfig()
    parser.add_argument("--model", default=defaults.model, help="model name or HF directory")
    parser.add_argument(
        "--replicas",
        type=int,
        default=defaults.num_replicas,
        help="worker replicas (with --schedule/--plan: copies of the plan, each running the "
        "plan's own data-parallel replicas)",
    )
    parser.add_argument("--host", default=defaults.host, help="interface the gateway binds")
    parser.add_argument(
        "--worker-host",
        default=defaults.worker_host,
        help="interface workers and stages bind (default loopback: only the gateway is exposed)",
    )
    parser.add_argument(
        "--http-port", type=int, default=defaults.http_port, help="OpenAI-compatible gateway"
    )
    parser.add_argument(
        "--grpc-port", type=int, default=defaults.grpc_port, help="router gRPC (SDK)"
    )
    parser.add_argument(
        "--batching",
        choices=[kind.value for kind in ScheduleKind],
        default=None,
        help="continuous, static, or a plan's kind (default: the plan's, else continuous)",
    )
    parser.add_argument(
        "--schedule",
        type=Path,
        default=None,
        help="deploy this `exegpt plan --json` plan: its placement and control variables",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        help="HOST:PORT of the scheduler service: every worker applies the schedules it "
        "pushes and reports observed lengths and stage times to it",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=defaults.max_batch_size, help="per worker"
    )
    parser.add_argument(
        "--kv-cache-mb", type=float, default=defaults.kv_cache_mb, help="KV pool per worker, MiB"
    )
    parser.add_argument(
        "--engine-policy",
        choices=("fcfs", "memory_aware", "sjf"),
        default=None,
        help="every worker's engine policy (default fcfs); the router's is --router-arg=--policy=X",
    )
    parser.add_argument(
        "--max-tokens-per-step",
        type=int,
        default=None,
        help="every worker's chunked-prefill budget: tokens a step, decodes included "
        "(decoder-only models; default off)",
    )
    parser.add_argument(
        "--long-output-tokens-per-step",
        type=int,
        default=None,
        help="every worker's chunk budget while all its decoding requests expect long outputs "
        "(needs --max-tokens-per-step; default off)",
    )
    parser.add_argument(
        "--long-output-min-tokens",
        type=int,
        default=None,
        help="the output length every decoding request must expect for the "
        f"--long-output-tokens-per-step budget (default {DEFAULT_LONG_OUTPUT_MIN_TOKENS})",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=defaults.dtype,
        help="weights, activations and KV cache of every worker (auto: bfloat16 where the "
        "device computes it fast, else float32)",
    )
    parser.add_argument("--torch-threads", type=positive_int, default=None, help="per worker")
    add_topology_arguments(parser)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where replicas compute: cpu, cuda (one GPU per process, in order: an in-process "
        "replica i gets cuda:i, a pipelined replica's stage processes the next GPUs) or cuda:N",
    )
    parser.add_argument(
        "--threads-per-device",
        type=int,
        default=None,
        help="intra-op threads of each computing process: a stage process, or an in-process "
        "replica's worker (default: cores / processes)",
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="write child logs here")
    restart = RestartPolicy()
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=restart.max_restarts,
        help="a child exiting more often than this within --restart-window-s stops everything",
    )
    parser.add_argument(
        "--restart-window-s",
        type=float,
        default=restart.window_s,
        help="seconds over which a child's exits count towards a crash loop",
    )
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        help="extra router flag, e.g. --router-arg=--stall-timeout-s=5 (repeatable)",
    )
    add_security_arguments(parser)
    autoplan.add_arguments(parser)  # --plan: profile (cached), plan, deploy
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> DeploymentConfig:
    plan = PlanFile.read(args.schedule) if args.schedule else None
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    return DeploymentConfig(
        model=args.model,
        num_replicas=plan.num_workers(args.replicas) if plan else args.replicas,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        batching=args.batching,
        max_batch_size=args.max_batch_size,
        engine_policy=args.engine_policy,
        max_tokens_per_step=args.max_tokens_per_step,
        long_output_tokens_per_step=args.long_output_tokens_per_step,
        long_output_min_tokens=args.long_output_min_tokens,
        kv_cache_mb=args.kv_cache_mb,
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        log_dir=args.log_dir,
        extra_router_args=tuple(args.router_arg),
        restart=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s),
        topology=topology_from_args(args, plan.placement if plan else None),
        schedule_file=args.schedule.resolve() if args.schedule else None,
        scheduler=args.scheduler,
        worker_host=args.worker_host,
        security=security_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.plan:
            autoplan.prepare_up(args)
        deployment = Deployment(config_from_args(args))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deployment.start()
    except LaunchError as exc:
        logger.error("deployment failed to start: %s", exc)
        return 1
    sys.stdout.write(
        f"exegpt ready: http={deployment.http_url} grpc={deployment.grpc_address} "
        f"replicas={','.join(deployment.worker_addresses)}\n"
    )
    sys.stdout.flush()
    try:
        while not stop.wait(0.25):
            if crash_loop := deployment.supervise():
                logger.error("%s", crash_loop)
                return 1
    finally:
        deployment.stop()
        logger.info("all services stopped")
    return 0
