"""`exegpt bench`: replay a workload against a running gateway and report throughput and latency.

Open-loop: requests leave at their planned arrival times (Poisson at --rate, all at once for
--rate inf, or a trace's own timestamps), whatever is still in flight. The table goes to
stdout, the progress bar to stderr, and --json keeps every metric with the exact settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from exegpt.bench.client import (
    BenchError,
    ClientConfig,
    RequestRecord,
    ServerInfo,
    fetch_server_info,
    make_session,
    normalize_url,
    run_benchmark,
)
from exegpt.bench.metrics import build_report, format_report
from exegpt.bench.workload_plan import (
    DEFAULT_TASK_NUM_REQUESTS,
    TRACE_ATTRIBUTION,
    ClampResult,
    PlannedRequest,
    PlanOptions,
    WorkloadKind,
    WorkloadSpec,
    build_plan,
    clamp_to_context,
    parse_workload,
)
from exegpt.security import API_KEY_ENV

DESCRIPTION = "benchmark a running deployment with a workload"
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--workload", required=True, help="task:S|T|G|C1|C2 (the paper's tasks) or trace:PATH"
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        help=f"requests to send (default: {DEFAULT_TASK_NUM_REQUESTS} for a task, "
        "every row of a trace)",
    )
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument(
        "--rate",
        type=float,
        help="Poisson arrivals per second; inf sends all at once (default for tasks). "
        "With a trace, replaces its timestamps",
    )
    arrivals.add_argument(
        "--trace-time-scale",
        type=float,
        help="multiply a trace's arrival times (0.1 replays 10x faster; default 1)",
    )
    parser.add_argument(
        "--length-scale", type=float, default=1.0, help="multiply input and output lengths"
    )
    parser.add_argument(
        "--latency-bound", type=float, help="seconds; report the fraction finished within it"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds lengths, arrivals, prompts")
    parser.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    parser.add_argument("--model", help="model id to use (default: the gateway's first)")
    parser.add_argument("--json", type=Path, help="write metrics and settings to this file")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA for an https gateway")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


@dataclass(frozen=True)
class BenchSettings:
    url: str
    workload: WorkloadSpec
    plan: PlanOptions
    latency_bound_s: float | None
    max_concurrency: int | None
    timeout_s: float
    model: str | None
    json_path: Path | None
    api_key: str | None = field(default=None, repr=False)  # never written to reports
    tls_ca: Path | None = None


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validated settings; raises ValueError (or BenchError for the URL) with a readable message."""
    workload = parse_workload(args.workload)
    plan = PlanOptions(
        num_requests=args.num_requests,
        rate_per_s=args.rate,
        trace_time_scale=args.trace_time_scale,
        length_scale=args.length_scale,
        seed=args.seed,
    )
    plan.validate(workload)
    if args.latency_bound is not None and not args.latency_bound > 0:
        raise ValueError(f"--latency-bound must be positive, got {args.latency_bound}")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise ValueError(f"--max-concurrency must be positive, got {args.max_concurrency}")
    if not args.timeout_s > 0:
        raise ValueError(f"--timeout-s must be positive, got {args.timeout_s}")
    return BenchSettings(
        url=normalize_url(args.url),
        workload=workload,
        plan=plan,
        latency_bound_s=args.latency_bound,
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout_s,
        model=args.model,
        json_path=args.json,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tls_ca=args.tls_ca,
    )


@dataclass(frozen=True)
class BenchResult:
    server: ServerInfo
    clamp: ClampResult
    records: list[RequestRecord]
    started_at: str


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        plan = build_plan(settings.workload, settings.plan)
    except (ValueError, BenchError) as exc:
        return _fail(str(exc))
    _raise_open_file_limit()
    try:
        result = asyncio.run(_bench(settings, plan))
    except BenchError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
    report = build_report(result.records, settings.latency_bound_s)
    used = settings_record(settings, result)
    footer = [f"trace: {TRACE_ATTRIBUTION}"] if used["trace_attribution"] else []
    title = f"exegpt bench: {settings.workload}"
    sys.stdout.write(format_report(report, title, settings_rows(used), footer) + "\n")
    if settings.json_path is not None:
        rows = [_request_row(record) for record in result.records]
        document = {"settings": used, "metrics": report, "requests": rows}
        try:
            settings.json_path.parent.mkdir(parents=True, exist_ok=True)
            settings.json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        except OSError as exc:
            return _fail(f"cannot write {settings.json_path}: {exc.strerror or exc}")
        logger.info("wrote %s", settings.json_path)
    if report["num_ok"] == 0:
        return _fail("every request failed", code=1)
    return 0


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"exegpt bench: {message}\n")
    return code


async def _bench(settings: BenchSettings, plan: list[PlannedRequest]) -> BenchResult:
    async with make_session(settings.api_key, settings.tls_ca) as session:
        server = await fetch_server_info(session, settings.url, settings.model)
        clamp = clamp_to_context(plan, server.max_model_len)
        if clamp.num_clamped:
            logger.warning(
                "%d of %d requests shortened to fit the context of %d tokens",
                clamp.num_clamped,
                len(plan),
                server.max_model_len,
            )
        config = ClientConfig(
            url=settings.url,
            server=server,
            seed=settings.plan.seed,
            max_concurrency=settings.max_concurrency,
            timeout_s=settings.timeout_s,
        )
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        with tqdm(total=len(plan), desc="requests", unit="req", file=sys.stderr) as bar:
            records = await run_benchmark(
                session, clamp.requests, config, on_done=lambda _: bar.update(1)
            )
    return BenchResult(server, clamp, records, started_at)


def settings_record(settings: BenchSettings, result: BenchResult) -> dict[str, Any]:
    """The exact settings of a run, as the JSON report keeps them."""
    options = settings.plan
    is_trace = settings.workload.kind is WorkloadKind.TRACE
    rate = options.rate_per_s
    if rate is None and not is_trace:
        rate = math.inf
    replays_trace_times = is_trace and rate is None
    return {
        "url": settings.url,
        "workload": str(settings.workload),
        "num_requests": len(result.records),
        "arrivals": "trace" if replays_trace_times else "poisson",
        "rate_per_s": None if rate is None else ("inf" if math.isinf(rate) else rate),
        "trace_time_scale": (options.trace_time_scale or 1.0) if replays_trace_times else None,
        "length_scale": options.length_scale,
        "seed": options.seed,
        "latency_bound_s": settings.latency_bound_s,
        "max_concurrency": settings.max_concurrency,
        "timeout_s": settings.timeout_s,
        "model": result.server.model,
        "max_model_len": result.server.max_model_len,
        "vocab_size": result.server.vocab_size,
        "num_clamped": result.clamp.num_clamped,
        "started_at": result.started_at,
        "trace_attribution": TRACE_ATTRIBUTION if is_trace else None,
    }


def settings_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The knobs every result must be reported with, as table rows."""
    if record["arrivals"] == "trace":
        arrivals = f"trace timestamps x {record['trace_time_scale']:g}"
    elif record["rate_per_s"] == "inf":
        arrivals = "all at once (rate inf)"
    else:
        arrivals = f"Poisson, {record['rate_per_s']:g} req/s"
    return [
        ("model", f"{record['model']} (context {record['max_model_len']} tokens)"),
        ("arrivals", arrivals),
        ("length scale", f"{record['length_scale']:g}"),
        ("seed", str(record["seed"])),
        ("clamped to context", f"{record['num_clamped']} of {record['num_requests']}"),
    ]


def _request_row(record: RequestRecord) -> dict[str, Any]:
    return {
        "index": record.index,
        "arrival_s": record.arrival_s,
        "send_s": record.send_s,
        "ttft_s": record.ttft_s,
        "e2e_s": record.e2e_s,
        "queue_s": record.queue_s,
        "generation_s": record.generation_s,
        "input_tokens": record.input_tokens,
        "expected_output_tokens": record.expected_output_tokens,
        "output_tokens": record.num_output_tokens,
        "usage_completion_tokens": record.usage_completion_tokens,
        "finish_reason": record.finish_reason,
        "error": record.error,
    }


def _raise_open_file_limit() -> None:
    # Open-loop saturation keeps one socket per in-flight request; the usual soft limit of
    # 1024 descriptors is too few for a few thousand of them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
        except (ValueError, OSError):
            logger.debug("could not raise the open-file limit from %d", soft)
