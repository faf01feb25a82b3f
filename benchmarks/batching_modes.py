"""Continuous vs static batching, side by side in one run, on the same workload.

Starts a local deployment (`exegpt up`'s launcher) for each batching mode in turn, drives it
with `exegpt bench`, and prints both reports' key figures with the ratio continuous / static.
Machines here are noisy and shared: compare the ratio, not the absolute numbers.

    .venv/bin/python benchmarks/batching_modes.py --workload task:S --num-requests 200
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from exegpt.launcher import Deployment, DeploymentConfig

MODES = ("continuous", "static")
ROWS = (
    ("throughput (seq/s)", ("throughput", "sequences_per_s"), 1.0),
    ("output tokens/s", ("throughput", "output_tokens_per_s"), 1.0),
    ("e2e latency p50 (s)", ("e2e_latency_s", "p50"), 1.0),
    ("e2e latency p99 (s)", ("e2e_latency_s", "p99"), 1.0),
    ("TTFT p50 (ms)", ("ttft_s", "p50"), 1e3),
    ("TPOT p50 (ms)", ("tpot_s", "p50"), 1e3),
    ("within latency bound", ("fraction_within_bound",), 1.0),
    ("failed requests", ("num_failed",), 1.0),
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_mode(mode: str, args: argparse.Namespace, out_dir: Path) -> dict:
    config = DeploymentConfig(
        num_replicas=args.replicas,
        http_port=_free_port(),
        grpc_port=_free_port(),
        batching=mode,
        max_batch_size=args.max_batch_size,
        log_dir=out_dir,
    )
    json_path = out_dir / f"{mode}.json"
    with Deployment(config) as deployment:
        command = [
            sys.executable, "-m", "exegpt.cli", "bench",
            "--url", deployment.http_url,
            "--workload", args.workload,
            "--num-requests", str(args.num_requests),
            "--rate", str(args.rate),
            "--latency-bound", str(args.latency_bound),
            "--json", str(json_path),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(json_path.read_text())["metrics"]


def _value(metrics: dict, path: tuple[str, ...]) -> float | None:
    value: object = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'':24}{'continuous':>12}{'static':>12}{'cont/static':>13}"]
    for label, path, scale in ROWS:
        cont, static = (_value(results[mode], path) for mode in MODES)
        cells = [f"{v * scale:12.3f}" if v is not None else f"{'-':>12}" for v in (cont, static)]
        ratio = f"{cont / static:13.2f}" if cont is not None and static else f"{'-':>13}"
        lines.append(f"{label:24}{''.join(cells)}{ratio}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="task:S")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--rate", default="inf", help="Poisson arrivals per second")
    parser.add_argument("--latency-bound", type=float, default=30.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="exegpt-batching-"))
    results = {mode: bench_mode(mode, args, out_dir) for mode in MODES}
    settings = (
        f"{args.workload}, {args.num_requests} requests, rate {args.rate}, "
        f"{args.replicas} replica(s), max batch {args.max_batch_size}"
    )
    sys.stdout.write(f"batching modes: {settings}\n{format_table(results)}\n")
    sys.stdout.write(f"reports and logs: {out_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
