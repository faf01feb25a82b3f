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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_runs import BASELINE, Run, Setup, cells, deployment_config, header, ratios, replay  # noqa: E402

from exegpt.launcher import Deployment  # noqa: E402

DEFAULT_COMBOS = (
    "fcfs+round_robin,memory_aware+round_robin,sjf+round_robin,"
    "fcfs+least_requests,fcfs+token_aware,memory_aware+token_aware"
)


def bench_run(run: Run, args: argparse.Namespace, json_path: Path) -> dict:
    """One deployment of `run`, the trace replayed against it; its metrics + preemptions."""
    setup = Setup(args.model, args.kv_cache_mb, args.max_batch_size)
    bench = [
        "--workload", f"trace:{args.trace}", "--num-requests", str(args.num_requests),
        "--trace-time-scale", str(args.trace_time_scale), "--length-scale",
        str(args.length_scale), "--seed", str(args.seed),
    ]  # fmt: skip
    with Deployment(deployment_config(run, setup)) as deployment:
        return replay(deployment, bench, json_path)


def format_table(results: dict[str, dict]) -> str:
    lines = [header("engine+router", 28)]
    base = results.get(BASELINE)
    for name, metrics in results.items():
        lines.append(f"{name:28}{cells(metrics)}{ratios(metrics, base)}")
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
