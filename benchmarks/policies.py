"""Engine x router policies side by side on a replayed trace: 2 replicas, one deployment per
combination, driven by `exegpt bench --workload trace:PATH`.

    python benchmarks/policies.py /path/to/azure2023_conv.csv --num-requests 80 \
        --trace-time-scale 0.05 --length-scale 0.25 --kv-cache-mb 8

The trace is read from the path given (this repository holds none). One table: throughput,
TTFT and TPOT p50/p99, e2e p99 and preemptions per combination, and each one's ratios to
fcfs + round_robin (TTFT p99, TPOT p99, throughput). Preemptions are read from every
worker's GetStats before the deployment stops.

A combination may end in `+chunkN`, e.g. `memory_aware+token_aware+chunk64`: its workers run
chunked prefill with at most N prompt tokens a step (`--max-tokens-per-step`; decoder-only
models only: pass `--model` a Llama checkpoint, T5 prompts are never chunked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deployments import free_port, metric  # noqa: E402

from exegpt.launcher import Deployment, DeploymentConfig  # noqa: E402
from exegpt.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

BASELINE = "fcfs+round_robin"
DEFAULT_COMBOS = (
    "fcfs+round_robin,memory_aware+round_robin,sjf+round_robin,"
    "fcfs+least_requests,fcfs+token_aware,memory_aware+token_aware"
)
COLUMNS = (  # label, metrics path, scale, format
    ("seq/s", ("throughput", "sequences_per_s"), 1.0, "{:8.2f}"),
    ("tok/s", ("throughput", "output_tokens_per_s"), 1.0, "{:8.1f}"),
    ("TTFT p50", ("ttft_s", "p50"), 1e3, "{:9.0f}"),
    ("TTFT p99", ("ttft_s", "p99"), 1e3, "{:9.0f}"),
    ("TPOT p50", ("tpot_s", "p50"), 1e3, "{:9.1f}"),
    ("TPOT p99", ("tpot_s", "p99"), 1e3, "{:9.1f}"),
    ("e2e p99", ("e2e_latency_s", "p99"), 1.0, "{:8.2f}"),
    ("failed", ("num_failed",), 1.0, "{:7.0f}"),
)
RATIOS = (("TTFT p99", ("ttft_s", "p99")), ("TPOT p99", ("tpot_s", "p99")),
          ("seq/s", ("throughput", "sequences_per_s")))  # fmt: skip


@dataclass(frozen=True)
class Run:
    engine_policy: str
    router_policy: str
    max_tokens_per_step: int | None = None  # chunked prefill; None: off

    @property
    def name(self) -> str:
        chunked = f"+chunk{self.max_tokens_per_step}" if self.max_tokens_per_step else ""
        return f"{self.engine_policy}+{self.router_policy}{chunked}"

    @classmethod
    def parse(cls, combo: str) -> Run:
        """`engine+router` or `engine+router+chunkN`."""
        engine, router, *chunk = combo.split("+")
        budget = int(chunk[0].removeprefix("chunk")) if chunk else None
        return cls(engine, router, budget)


def worker_stats(addresses: list[str]) -> list[worker_pb2.WorkerStats]:
    async def read() -> list[worker_pb2.WorkerStats]:
        stats = []
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                stats.append(await stub.GetStats(worker_pb2.GetStatsRequest(), timeout=10))
        return stats

    return asyncio.run(read())


def bench_run(run: Run, args: argparse.Namespace, json_path: Path) -> dict:
    """One deployment of `run`, the trace replayed against it; its metrics + preemptions."""
    config = DeploymentConfig(
        model=args.model,
        num_replicas=2,
        http_port=free_port(),
        grpc_port=free_port(),
        max_batch_size=args.max_batch_size,
        kv_cache_mb=args.kv_cache_mb,
        engine_policy=run.engine_policy,
        max_tokens_per_step=run.max_tokens_per_step,
        extra_router_args=(
            f"--policy={run.router_policy}",
            f"--health-check-interval-s={args.poll_interval_s}",
        ),
    )
    bench = [
        sys.executable, "-m", "exegpt.cli", "bench", "--workload", f"trace:{args.trace}",
        "--num-requests", str(args.num_requests), "--trace-time-scale", str(args.trace_time_scale),
        "--length-scale", str(args.length_scale), "--seed", str(args.seed),
    ]  # fmt: skip
    with Deployment(config) as deployment:
        command = [*bench, "--url", deployment.http_url, "--json", str(json_path)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        stats = worker_stats(list(deployment.worker_addresses))
    metrics = json.loads(json_path.read_text())["metrics"]
    metrics["preemptions"] = sum(s.num_preemptions for s in stats)
    metrics["finished_per_replica"] = [s.num_finished for s in stats]
    return metrics


def format_table(results: dict[str, dict]) -> str:
    head = f"{'engine+router':28}" + "".join(f"{label:>10}" for label, *_ in COLUMNS)
    head += f"{'preempt':>9}" + "".join(f"{label + ' x':>12}" for label, _ in RATIOS)
    lines = [head]
    base = results.get(BASELINE)
    for name, metrics in results.items():
        cells = ""
        for _, path, scale, fmt in COLUMNS:
            value = metric(metrics, path)
            cells += f"{fmt.format(value * scale):>10}" if value is not None else f"{'-':>10}"
        cells += f"{metrics['preemptions']:9d}"
        for _, path in RATIOS:
            value, ref = metric(metrics, path), metric(base, path) if base else None
            cells += f"{value / ref:12.2f}" if value is not None and ref else f"{'-':>12}"
        lines.append(f"{name:28}{cells}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="an Azure LLM inference trace CSV")
    parser.add_argument("--combos", default=DEFAULT_COMBOS, help="engine+router[+chunkN],...")
    parser.add_argument("--num-requests", type=int, default=80)
    parser.add_argument("--trace-time-scale", type=float, default=0.05)
    parser.add_argument("--length-scale", type=float, default=0.25)
    parser.add_argument("--kv-cache-mb", type=float, default=8.0, help="per replica")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--poll-interval-s", type=float, default=0.2, help="router's polls")
    parser.add_argument("--model", default="exegpt-tiny-t5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.trace.is_file():
        parser.error(f"no trace at {args.trace}")
    runs = [Run.parse(combo) for combo in args.combos.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            sys.stderr.write(f"running {run.name}\n")
            results[run.name] = bench_run(run, args, Path(tmp) / f"{run.name}.json")
    print(f"trace {args.trace.name}: {args.num_requests} requests, time x{args.trace_time_scale}, "
          f"lengths x{args.length_scale}, 2 replicas, KV {args.kv_cache_mb} MiB each; ms unless "
          "noted, e2e in s")  # fmt: skip
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
