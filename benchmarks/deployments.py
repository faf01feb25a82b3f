"""What the side-by-side serving benchmarks share: start a deployment, drive it with
`exegpt bench`, read the report's figures, print them as one table with ratios."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from exegpt.launcher import Deployment, DeploymentConfig

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_deployment(config: DeploymentConfig, bench_args: list[str], json_path: Path) -> dict:
    """Start `config` on free ports, run `exegpt bench` against it, return its metrics."""
    with Deployment(on_free_ports(config)) as deployment:
        return run_bench(deployment, bench_args, json_path)


def on_free_ports(config: DeploymentConfig) -> DeploymentConfig:
    return replace(config, http_port=free_port(), grpc_port=free_port())


def run_bench(deployment: Deployment, bench_args: list[str], json_path: Path) -> dict:
    """Run `exegpt bench` against a started deployment; return its report's metrics."""
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "bench", "--url", deployment.http_url,
        *bench_args, "--json", str(json_path),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(json_path.read_text())["metrics"]


def metric(metrics: dict, path: tuple[str, ...]) -> float | None:
    value: object = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def format_table(results: dict[str, dict], baseline: str) -> str:
    """One column per run, then each run's ratio to `baseline`."""
    names = list(results)
    others = [n for n in names if n != baseline]
    header = "".join(f"{n:>14}" for n in names) + "".join(
        f"{n + '/' + baseline:>22}" for n in others
    )
    lines = [f"{'':24}{header}"]
    for label, path, scale in ROWS:
        values = {n: metric(results[n], path) for n in names}
        cells = "".join(
            f"{v * scale:14.3f}" if v is not None else f"{'-':>14}" for v in values.values()
        )
        base = values[baseline]
        ratios = "".join(
            f"{values[n] / base:22.2f}" if values[n] is not None and base else f"{'-':>22}"
            for n in others
        )
        lines.append(f"{label:24}{cells}{ratios}")
    return "\n".join(lines)
