"""Continuous vs static batching, side by side in one run, on the same workload.

Starts a local deployment (`exegpt up`'s launcher) for each batching mode in turn, drives it
with `exegpt bench`, and prints both reports' key figures with the ratio continuous / static.
Machines here are noisy and shared: compare the ratio, not the absolute numbers.

    .venv/bin/python benchmarks/batching_modes.py --workload task:S --num-requests 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployments import bench_deployment, format_table  # noqa: E402

from exegpt.launcher import DeploymentConfig  # noqa: E402

MODES = ("continuous", "static")


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
    bench_args = [
        "--workload", args.workload, "--num-requests", str(args.num_requests),
        "--rate", str(args.rate), "--latency-bound", str(args.latency_bound),
    ]  # fmt: skip
    results = {}
    for mode in MODES:
        config = DeploymentConfig(
            num_replicas=args.replicas, batching=mode, max_batch_size=args.max_batch_size,
            log_dir=out_dir,
        )  # fmt: skip
        results[mode] = bench_deployment(config, bench_args, out_dir / f"{mode}.json")
    settings = (
        f"{args.workload}, {args.num_requests} requests, rate {args.rate}, "
        f"{args.replicas} replica(s), max batch {args.max_batch_size}"
    )
    sys.stdout.write(f"batching modes: {settings}\n{format_table(results, 'static')}\n")
    sys.stdout.write(f"reports and logs: {out_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
