"""Run the router with its HTTP gateway: `python -m services.router --replicas H:P,H:P`."""

from __future__ import annotations

import argparse
import logging
import sys

from exegpt.command_line import command_main
from exegpt.security import add_security_arguments, security_from_args
from exegpt.serving import run_service, wait_for_shutdown_signal, write_ready_file
from services.router.config import RouterConfig
from services.router.policies import RouterPolicy

DESCRIPTION = "run the router with its OpenAI-compatible HTTP gateway"
logger = logging.getLogger("exegpt.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RouterConfig(replicas=("-",))
    parser.add_argument(
        "--replicas", required=True, help="comma-separated worker addresses (host:port)"
    )
    parser.add_argument("--host", default=defaults.host, help="interface to bind")
    parser.add_argument(
        "--grpc-port", type=int, default=defaults.grpc_port, help="gRPC Router (SDK)"
    )
    parser.add_argument(
        "--http-port", type=int, default=defaults.http_port, help="OpenAI-compatible gateway"
    )
    parser.add_argument(
        "--policy",
        choices=[p.value for p in RouterPolicy],
        default=defaults.policy.value,
        help="how a replica is chosen (default %(default)s: the least queued prefill + "
        "expected decode tokens, pushed by each replica)",
    )
    parser.add_argument(
        "--health-check-interval-s",
        type=float,
        default=defaults.health_check_interval_s,
        help="seconds between replica health checks",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=defaults.request_timeout_s,
        help="a request still running after this gets DEADLINE_EXCEEDED / 504 "
        "(caps a longer gRPC client deadline too)",
    )
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=defaults.stall_timeout_s,
        help="a replica whose open streams make no progress for this long is cancelled: "
        "streams without a token are retried elsewhere, the others get UNAVAILABLE",
    )
    parser.add_argument(
        "--max-body-kb",
        type=float,
        default=defaults.max_body_bytes / 1024,
        help="HTTP bodies over this get 413",
    )
    parser.add_argument(
        "--http-idle-timeout-s",
        type=float,
        default=defaults.http_idle_timeout_s,
        help="close HTTP connections that send no complete request head, or sit idle, this long",
    )
    parser.add_argument(
        "--http-body-timeout-s",
        type=float,
        default=defaults.http_body_timeout_s,
        help="an HTTP body not received within this gets 408",
    )
    add_security_arguments(parser)
    parser.add_argument("--ready-file", default=None, help="write the gRPC host:port when ready")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    replicas = tuple(address.strip() for address in args.replicas.split(",") if address.strip())
    return RouterConfig(
        replicas=replicas,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        policy=RouterPolicy(args.policy),
        health_check_interval_s=args.health_check_interval_s,
        request_timeout_s=args.request_timeout_s,
        stall_timeout_s=args.stall_timeout_s,
        max_body_bytes=int(args.max_body_kb * 1024),
        http_idle_timeout_s=args.http_idle_timeout_s,
        http_body_timeout_s=args.http_body_timeout_s,
        ready_file=args.ready_file,
        security=security_from_args(args),
    )


async def serve(config: RouterConfig) -> None:
    from services.router.server import start_router

    running = await start_router(config)
    write_ready_file(config.ready_file, f"{running.grpc_address} {running.http_url}")
    await wait_for_shutdown_signal()
    logger.info("shutting down router")
    await running.stop(config.grace_period_s)


def run(args: argparse.Namespace) -> int:
    return run_service("router", lambda: serve(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(command_main("python -m services.router", DESCRIPTION, add_arguments, run))
