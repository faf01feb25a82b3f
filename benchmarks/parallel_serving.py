"""Two devices, three ways, side by side in one run: 2 data-parallel replicas, one replica
over 2 pipeline stages, one replica at tensor-parallel degree 2.

On a CPU machine a device is a process with its own thread, so each setup gets 2 compute
processes of 1 thread. Each is driven to saturation (every request at once) with the same
`exegpt bench` workload; the table shows each and its ratio to data parallelism. Machines
here are noisy and shared: compare the ratios.

    .venv/bin/python benchmarks/parallel_serving.py --workload task:S --num-requests 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployments import bench_deployment, format_table  # noqa: E402

from exegpt.launcher import DeploymentConfig  # noqa: E402
from exegpt.topology import Topology  # noqa: E402

SETUPS = {
    "DP 2": (2, Topology()),
    "PP 2": (1, Topology(pipeline_stages=2, threads_per_device=1)),
    "TP 2": (1, Topology(tensor_parallel=2, threads_per_device=1)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="task:S")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--latency-bound", type=float, default=60.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--model", default="exegpt-tiny-t5")
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="exegpt-parallel-"))
    bench_args = [
        "--workload", args.workload, "--num-requests", str(args.num_requests),
        "--rate", "inf", "--latency-bound", str(args.latency_bound),
    ]  # fmt: skip
    results = {}
    for name, (num_replicas, topology) in SETUPS.items():
        config = DeploymentConfig(
            model=args.model, num_replicas=num_replicas, max_batch_size=args.max_batch_size,
            torch_threads=1, log_dir=out_dir / name.replace(" ", ""), topology=topology,
        )  # fmt: skip
        config.log_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        json_path = out_dir / f"{name.replace(' ', '')}.json"
        results[name] = bench_deployment(config, bench_args, json_path)
        sys.stdout.write(f"{name} done\n")
        sys.stdout.flush()
    settings = (
        f"{args.workload}, {args.num_requests} requests at once, max batch {args.max_batch_size}"
    )
    sys.stdout.write(f"2 devices: {settings}\n{format_table(results, 'DP 2')}\n")
    sys.stdout.write(f"reports and logs: {out_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
