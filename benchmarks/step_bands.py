"""What serving adds to a step, by its size: each band of rows' forward time against the
profile's price of the same step, on a real deployment at saturation.

A deployment (`exegpt up`'s launcher) of `--replicas` replicas of one thread each serves a
warm-up burst and then a saturating burst of the task (`exegpt bench`, lengths x
`--length-scale`). The engines' clocks over that burst, per step kind and power-of-two band
of rows (GetStats `step_totals_by_rows`, services/worker/engine_clock.py), are summed over the
replicas; each band's mean forward per step is printed beside what the profile prices for a
step of its mean rows at the workload's expected lengths, as the simulator composes it
(services/scheduler/simulator/common.py: a prefill's encoder layers, an encoder-decoder's
first decoder step and the embeddings and LM head, `prefill_parts`; a decode step's layers,
embedding and LM head), and their ratio. One calibration factor per kind of step is right
when a kind's ratio is the same in every band (docs/measurements.md, Profiling and
calibration, has what it showed).

    python benchmarks/step_bands.py --profile PROFILE --task T --batching static --batch 414
    python benchmarks/step_bands.py --profile PROFILE --task T --batch 88 --requests 700
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from schedule_runs import on_free_ports  # noqa: E402

from exegpt.bench.against_plan import run_bench  # noqa: E402
from exegpt.commands.calibration_pass import (  # noqa: E402
    KindTotals,
    sum_totals,
    totals_between,
)
from exegpt.cost_model import at_rows  # noqa: E402
from exegpt.launcher import Deployment, DeploymentConfig  # noqa: E402
from services.scheduler.problem_builder import load_cost_model  # noqa: E402
from services.scheduler.simulate import workload_of  # noqa: E402
from services.scheduler.simulator.common import (  # noqa: E402
    LayerCosts,
    WorkloadStats,
    prefill_parts,
)

Band = tuple[str, int]  # (step kind, the band's smallest rows)


def band_totals(address: str) -> dict[Band, KindTotals]:
    """A worker's engine clock by step kind and band of rows."""
    import grpc

    from exegpt.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stats = worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest())
    return {
        (t.kind, t.min_rows): KindTotals(t.num_steps, t.num_rows, t.forward_s, t.host_s)
        for t in stats.step_totals_by_rows
    }


def burst_bands(args: argparse.Namespace, work: Path) -> dict[Band, KindTotals]:
    """The bands' totals over the measured burst, summed over the replicas."""
    config = DeploymentConfig(
        num_replicas=args.replicas,
        batching=args.batching,
        torch_threads=1,
        max_batch_size=args.batch,
        kv_cache_mb=args.kv_cache_mb,
        log_dir=work / "logs",
        startup_timeout_s=300.0,
        extra_worker_args=("--max-queue-size", "8192"),
    )
    workload = f"task:{args.task}"
    with Deployment(on_free_ports(config)) as deployment:
        warmup = max(16, args.requests // 4)
        run_bench(deployment.http_url, workload, warmup, work / "warmup.json", args.length_scale)
        before = [band_totals(a) for a in deployment.worker_addresses]
        document = run_bench(
            deployment.http_url, workload, args.requests, work / "burst.json", args.length_scale
        )
        after = [band_totals(a) for a in deployment.worker_addresses]
    metrics = document["metrics"]
    print(
        f"{args.task} {args.batching} batch {args.batch} x{args.replicas}: {args.requests} "
        f"requests, {metrics['num_failed']} failed, "
        f"{metrics['throughput']['sequences_per_s']:.2f} seq/s over the burst"
    )
    return sum_totals([totals_between(b, a) for b, a in zip(before, after, strict=True)])


def priced_s(costs: LayerCosts, kind: str, rows: float) -> float:
    """The profile's price of one step of `rows` (mean) rows, outside the host work."""
    shape = costs.model.shape

    def step_s(whole: int) -> float:
        if kind == "prefill":
            parts = prefill_parts(costs, whole)
            return parts.encoder_s + parts.first_step_s + parts.outside_s
        layers_s = shape.num_decode_layers * sum(costs.decode(whole, 1))
        return layers_s + costs.embedding_s(whole) + costs.lm_head_s(whole)

    return float(at_rows(rows, step_s))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="the profile to price steps with")
    parser.add_argument("--task", default="T", help="S, T, G, C1 or C2")
    parser.add_argument("--batching", default="continuous", choices=["continuous", "static"])
    parser.add_argument("--batch", type=int, default=64, help="running batch per replica")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=None, help="default: 4 x batch x R")
    parser.add_argument("--length-scale", type=float, default=0.25)
    parser.add_argument("--kv-cache-mb", type=float, default=1500.0)
    args = parser.parse_args()
    if args.batch < 1 or args.replicas < 1:
        parser.error("--batch and --replicas must be at least 1")
    args.requests = args.requests or 4 * args.batch * args.replicas
    model = load_cost_model(args.profile).model
    workload = workload_of(f"task:{args.task}", args.length_scale, model.shape.max_context_tokens)
    costs = LayerCosts(model, WorkloadStats.from_workload(workload))
    bands = burst_bands(args, Path(tempfile.mkdtemp(prefix="exegpt-bands-")))
    print(f"{'step':8s}{'rows':>10s}{'steps':>7s}{'rows/step':>11s}{'forward ms':>12s}"
          f"{'priced ms':>11s}{'ratio':>7s}{'host ms':>9s}")  # fmt: skip
    for (kind, low), totals in sorted(bands.items()):
        if totals.num_steps == 0:
            continue
        rows = totals.num_rows / totals.num_steps
        forward_s = totals.forward_s / totals.num_steps
        price_s = priced_s(costs, kind, rows)
        span = f"{low}-{2 * low - 1}" if low > 1 else "1"
        print(
            f"{kind:8s}{span:>10s}{totals.num_steps:>7d}{rows:>11.1f}{forward_s * 1e3:>12.2f}"
            f"{price_s * 1e3:>11.2f}{forward_s / price_s:>7.2f}"
            f"{totals.host_s / totals.num_steps * 1e3:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
