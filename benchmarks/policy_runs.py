"""What the policy benchmarks (policies.py, two_level.py) share: a combination of engine and
router policies, a 2-replica deployment running it, one `exegpt bench` replay against it with
the preemptions it caused, and the table columns."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from deployments import free_port, metric

from exegpt.bench.against_plan import completed_rows, steady_rate
from exegpt.bench.metrics import RowLatency, latency_figures
from exegpt.commands.calibration_pass import sum_totals, totals_between
from exegpt.launcher import Deployment, DeploymentConfig
from exegpt.v1 import worker_pb2, worker_pb2_grpc

BASELINE = "fcfs+round_robin"
NUM_REPLICAS = 2  # a deployment's
COLUMNS = (  # label, metrics path, scale, format
    ("seq/s", ("throughput", "sequences_per_s"), 1.0, "{:8.2f}"),
    ("tok/s", ("throughput", "output_tokens_per_s"), 1.0, "{:8.1f}"),
    ("TTFT p50", ("ttft_s", "p50"), 1e3, "{:9.0f}"),
    ("TTFT p99", ("ttft_s", "p99"), 1e3, "{:9.0f}"),
    ("TPOT p50", ("tpot_s", "p50"), 1e3, "{:9.1f}"),
    ("TPOT p99", ("tpot_s", "p99"), 1e3, "{:9.1f}"),
    ("e2e p99", ("e2e_latency_s", "p99"), 1.0, "{:8.2f}"),
    ("failed", ("num_failed",), 1.0, "{:7.0f}"),
    # The replicas' mean step wall time (GetStats deltas): a decode step, and a step with
    # prompt tokens (prefill, chunk or mixed). Against one engine alone
    # (chunk_budget.py), they show what the shared cores added.
    ("queue", ("queue_ms",), 1.0, "{:9.0f}"),  # mean arrival to admission, at the engine
    ("dec step", ("step_ms", "decode"), 1.0, "{:9.1f}"),
    ("pre step", ("step_ms", "prefill"), 1.0, "{:9.1f}"),
)
RATIOS = (("TTFT p99", ("ttft_s", "p99")), ("TPOT p99", ("tpot_s", "p99")),
          ("seq/s", ("throughput", "sequences_per_s")))  # fmt: skip


@dataclass(frozen=True)
class Run:
    engine_policy: str
    router_policy: str
    max_tokens_per_step: int | None = None  # chunked prefill; None: off
    long_output_tokens_per_step: int | None = None  # its budget for long outputs; None: off
    backfill: bool = False  # memory_aware's (`+backfill`: --backfill)

    @property
    def name(self) -> str:
        return f"{self.engine_policy}+{self.router_policy}{self.chunk_label}{self.backfill_label}"

    @property
    def chunk_label(self) -> str:
        """`+chunkN`, `+chunkN-M` with a long-output budget M, or nothing (unchunked)."""
        if not self.max_tokens_per_step:
            return ""
        long = f"-{self.long_output_tokens_per_step}" if self.long_output_tokens_per_step else ""
        return f"+chunk{self.max_tokens_per_step}{long}"

    @property
    def backfill_label(self) -> str:
        """`+backfill` (memory_aware's --backfill) or nothing."""
        return "+backfill" if self.backfill else ""

    def __post_init__(self) -> None:
        if self.backfill and self.engine_policy != "memory_aware":
            raise ValueError(f"+backfill needs the memory_aware engine policy: {self.name}")

    @classmethod
    def parse(cls, combo: str) -> Run:
        """`engine+router`, then optionally `+chunkN` or `+chunkN-M`, then `+backfill`;
        anything else is refused."""
        parts = combo.split("+")
        if len(parts) < 2 or not all(parts[:2]):
            raise ValueError(f"a run is engine+router[+chunkN[-M]][+backfill], not {combo!r}")
        engine, router, *rest = parts
        backfill = rest[-1:] == ["backfill"]
        chunk = rest[:-1] if backfill else rest
        if len(chunk) > 1 or (chunk and not chunk[0].startswith("chunk")):
            raise ValueError(f"unknown part {'+'.join(chunk)!r} in run {combo!r}")
        if not chunk:
            return cls(engine, router, backfill=backfill)
        fixed, long = chunk_budgets(chunk[0].removeprefix("chunk"))
        return cls(engine, router, fixed, long, backfill)


def chunk_budgets(text: str) -> tuple[int | None, int | None]:
    """A budget as the benchmarks name it: `N`, `N-M` (a long-output budget M) or `off`, as
    (--max-tokens-per-step, --long-output-tokens-per-step)."""
    if text == "off":
        return None, None
    fixed, _, long = text.partition("-")
    try:
        return int(fixed), int(long) if long else None
    except ValueError:
        raise ValueError(f"a chunk budget is N, N-M or off, not {text!r}") from None


def parse_budget(text: str) -> tuple[int | None, int | None, bool]:
    """chunk_budget.py's budget: a chunk budget (`chunk_budgets`), optionally `+backfill`
    (memory_aware's), as (fixed, long-output budget, backfill); anything else is refused."""
    chunks, plus, extra = text.partition("+")
    if plus and extra != "backfill":
        raise ValueError(f"a budget is N, N-M or off, then optionally +backfill, not {text!r}")
    return *chunk_budgets(chunks), extra == "backfill"


@dataclass(frozen=True)
class Setup:
    """What every deployment of a benchmark shares."""

    model: str
    kv_cache_mb: float
    max_batch_size: int
    torch_threads: int | None = None


def deployment_config(run: Run, setup: Setup) -> DeploymentConfig:
    """NUM_REPLICAS replicas on free ports running `run`'s policies."""
    return DeploymentConfig(
        model=setup.model,
        num_replicas=NUM_REPLICAS,
        http_port=free_port(),
        grpc_port=free_port(),
        max_batch_size=setup.max_batch_size,
        kv_cache_mb=setup.kv_cache_mb,
        engine_policy=run.engine_policy,
        max_tokens_per_step=run.max_tokens_per_step,
        long_output_tokens_per_step=run.long_output_tokens_per_step,
        torch_threads=setup.torch_threads,
        extra_worker_args=("--backfill",) if run.backfill else (),
        extra_router_args=(f"--policy={run.router_policy}",),
    )


def worker_stats(addresses: list[str]) -> list[worker_pb2.WorkerStats]:
    async def read() -> list[worker_pb2.WorkerStats]:
        stats = []
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                stats.append(await stub.GetStats(worker_pb2.GetStatsRequest(), timeout=10))
        return stats

    return asyncio.run(read())


def replay(deployment: Deployment, bench_args: list[str], json_path: Path) -> dict:
    """One `exegpt bench` run against a started deployment: its metrics, plus the
    preemptions it caused and the requests each replica finished (GetStats deltas)."""
    addresses = list(deployment.worker_addresses)
    before = worker_stats(addresses)
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "bench", "--url", deployment.http_url,
        *bench_args, "--json", str(json_path),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = worker_stats(addresses)
    document = json.loads(json_path.read_text())
    metrics = report_metrics(document)
    metrics["rows"] = document["requests"]  # every request, for pooled percentiles
    metrics["preemptions"] = sum(
        a.num_preemptions - b.num_preemptions for a, b in zip(after, before, strict=True)
    )
    metrics["kv_num_blocks"] = after[0].kv_num_blocks
    metrics["finished_per_replica"] = [
        a.num_finished - b.num_finished for a, b in zip(after, before, strict=True)
    ]
    metrics["step_ms"] = mean_step_ms(before, after)
    finished = sum(metrics["finished_per_replica"])
    queued_s = sum(a.queue_time_s - b.queue_time_s for a, b in zip(after, before, strict=True))
    metrics["queue_ms"] = 1e3 * queued_s / finished if finished else None
    return metrics


def report_metrics(document: dict) -> dict:
    """A bench JSON document's metrics, plus `steady_sequences_per_s`: the completions per
    second in its steady window (against_plan.steady_rate: fill and drain left out; what a
    burst sustains), None with too few completions."""
    metrics = document["metrics"]
    metrics["steady_sequences_per_s"] = steady_rate(completed_rows(document))
    return metrics


def combine(replays: list[dict]) -> dict:
    """Repeated replays of one cell as one: the latency percentiles (TTFT, TPOT, e2e, TPOT
    p99/p50 and the fraction within the bound) over the pool of every replay's requests
    (`pooled`), the median of every other number (the preemptions summed), the first
    replay's value of anything else."""
    combined = _medians(replays)
    rows = [row for replay in replays for row in replay["rows"]]
    combined.update(pooled(rows, replays[0].get("latency_bound_s")))
    combined["rows"] = rows
    return combined


def pooled(rows: list[dict], bound_s: float | None) -> dict:
    """The latency figures of bench request `rows` (several replays' requests pooled), as
    `exegpt bench` reports them for one replay: a p99 of R x N requests is a statistic where
    one replay's N = 80 made it the single slowest request."""
    ok = [RowLatency.of(r) for r in completed_rows({"requests": rows})]
    figures = latency_figures(ok, len(rows), bound_s)
    tpot = figures["tpot_s"]
    figures["tpot_p99_over_p50"] = tpot["p99"] / tpot["p50"] if tpot["p50"] else None
    figures["num_pooled"] = len(rows)
    figures["num_failed"] = len(rows) - len(ok)
    return figures


def _medians(replays: list[dict]) -> dict:
    """The median of every number of `replays` (nested dicts alike; the preemptions
    summed), the first replay's value of anything else."""
    combined: dict = {}
    for key, first in replays[0].items():
        values = [r.get(key) for r in replays]
        if all(isinstance(v, dict) for v in values):
            combined[key] = _medians(values)
        elif key == "preemptions":
            combined[key] = sum(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            combined[key] = statistics.median(values)
        else:
            combined[key] = first
    return combined


def mean_step_ms(
    before: list[worker_pb2.WorkerStats], after: list[worker_pb2.WorkerStats]
) -> dict[str, float]:
    """Per step kind, the mean wall time (forward + host) of the steps between the stats."""
    deltas = [
        totals_between(_by_kind(earlier), _by_kind(later))
        for earlier, later in zip(before, after, strict=True)
    ]
    return {
        kind: 1e3 * (t.forward_s + t.host_s) / t.num_steps
        for kind, t in sum_totals(deltas).items()
        if t.num_steps > 0
    }


def _by_kind(stats: worker_pb2.WorkerStats) -> dict:
    return {t.kind: t for t in stats.step_totals}


def cells(metrics: dict) -> str:
    """The COLUMNS of one run, then its preemptions."""
    text = ""
    for _, path, scale, fmt in COLUMNS:
        value = metric(metrics, path)
        text += f"{fmt.format(value * scale):>10}" if value is not None else f"{'-':>10}"
    return text + f"{metrics['preemptions']:9d}"


def ratios(metrics: dict, base: dict | None) -> str:
    """RATIOS of one run to the baseline's."""
    text = ""
    for _, path in RATIOS:
        value, ref = metric(metrics, path), metric(base, path) if base else None
        text += f"{value / ref:12.2f}" if value is not None and ref else f"{'-':>12}"
    return text


def header(first: str, width: int) -> str:
    head = f"{first:{width}}" + "".join(f"{label:>10}" for label, *_ in COLUMNS)
    return head + f"{'preempt':>9}" + "".join(f"{label + ' x':>12}" for label, _ in RATIOS)
