"""Where a request's time per output token goes, engine alone: one in-process engine (one torch
thread, no router, no HTTP, no client) replays a trace's requests as Poisson arrivals once per
chunked-prefill budget, side by side in one run.

    python benchmarks/chunk_budget.py --trace-dir ../shared/traces --trace code --rate 5

For each budget (`off`: whole prompts; `N-M`: N, and M while every decode expects a long
output, services/worker/chunked.py; a `+backfill` suffix runs memory_aware with --backfill)
it prints TTFT p50/p99 and TPOT p50/p99 as the engine's own token times give them (TPOT
as the bench defines it: (last token - first) / (tokens - 1) per request), TPOT p99 / p50,
the p99 of each request's longest gap between two tokens, every step kind's mean, p99 and
max time, and the same of the requests' queue time (arrival to admission), and the engine's
busy seconds (its clock: forwards and host work while it had work; the same requests, so
less is cheaper serving), and the step scheduler's calls in which the first request it was
offered could not start (the engine's `head_waits`, by calls, not steps), by
cause (no free blocks for its prefill, the policy's predicted peak, no batch slot, the
preempted first, no room in the chunk budget). A request with few output tokens has a TPOT
of one or two gaps: the step after its first token is what it sees, so the ratio of a step
that carries a chunk to a decode step bounds its TPOT against the median's.
--repeats R runs the budgets R times, interleaved, so that a shared machine's noise falls on
all of them.
Compare with benchmarks/two_level.py, which adds the serving path (router, HTTP, client) on the
same cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_runs import parse_budget  # noqa: E402
from two_level import TRACES, build_tiny_llama  # noqa: E402

from exegpt.generation import SamplingParams  # noqa: E402
from exegpt.models.loader import LoadedModel, load_model  # noqa: E402
from exegpt.workloads import TraceRequest, load_trace  # noqa: E402
from services.worker.config import EngineConfig  # noqa: E402
from services.worker.policies import EnginePolicy, PolicyConfig  # noqa: E402
from services.worker.requests import EngineEvent, EngineRequest  # noqa: E402
from services.worker.server import build_engine  # noqa: E402


def replay(
    loaded: LoadedModel, config: EngineConfig, rows: list[TraceRequest], gaps_s: list[float]
) -> tuple[dict[int, list[float]], dict[str, list[float]], dict[str, int]]:
    """Every request's token times (from its arrival), every step's time by kind plus every
    request's queue time (arrival to admission) as `queue`, and the calls in which the
    first request offered could not start, by cause (services/worker/admission.py, `head_waits`)."""
    engine = build_engine(loaded, config)
    steps: dict[str, list[float]] = {}
    engine.step_observers.append(
        lambda kind, rows, result: steps.setdefault(kind.value, []).append(result.compute_s)
    )
    times: dict[int, list[float]] = {}
    queued: list[float] = []  # arrival to admission, a request
    finished = threading.Semaphore(0)

    def collector(index: int):
        def on_event(event: EngineEvent) -> None:
            times.setdefault(index, []).extend(event.token_times_s)
            if event.timings is not None:
                queued.append((event.timings.admitted_ns - event.timings.arrival_ns) / 1e9)
            if event.finish_reason is not None or event.error is not None:
                finished.release()

        return on_event

    engine.start()
    try:
        for index, (row, gap_s) in enumerate(zip(rows, gaps_s, strict=True)):
            time.sleep(gap_s)
            prompt = [(7 * index + j) % 380 + 2 for j in range(max(1, row.input_tokens))]
            sampling = SamplingParams(max_tokens=max(1, row.output_tokens), ignore_eos=True)
            engine.submit(EngineRequest(f"r{index}", prompt, sampling, collector(index)))
        for _ in rows:
            if not finished.acquire(timeout=600):
                raise TimeoutError("a request did not finish in 10 minutes")
    finally:
        engine.stop()
    steps["queue"] = queued  # reported beside the steps
    stats = engine.stats()
    totals = stats.step_totals
    steps["busy"] = [  # the engine clock: forward and host seconds while it had work
        sum(t.forward_s for t in totals),
        sum(t.host_s for t in totals),
    ]
    return times, steps, dict(stats.head_waits)


def report(
    label: str,
    times: dict[int, list[float]],
    steps: dict[str, list[float]],
    head_waits: dict[str, int],
) -> str:
    ttfts = [t[0] for t in times.values() if t]
    multi = [t for t in times.values() if len(t) >= 2]
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in multi]
    gaps = [max(np.diff(t)) for t in multi]
    ttft50, ttft99 = np.percentile(ttfts, [50, 99]) * 1e3
    tpot50, tpot99 = np.percentile(tpots, [50, 99]) * 1e3
    lines = [
        f"{label:>8}{ttft50:10.0f}{ttft99:10.0f}{tpot50:10.1f}{tpot99:10.1f}"
        f"{tpot99 / tpot50:10.2f}{np.percentile(gaps, 99) * 1e3:10.0f}"
    ]
    forward_s, host_s = steps.pop("busy")
    lines.append(
        f"{'':8}  busy {forward_s + host_s:6.2f} s: forward {forward_s:6.2f} s, host "
        f"{host_s:6.2f} s"
    )
    waits = ", ".join(f"{cause} {n}" for cause, n in sorted(head_waits.items())) or "none"
    lines.append(f"{'':8}  head waited (calls): {waits}")
    for kind, seconds in sorted(steps.items()):
        mean, p99, most = (f(seconds) * 1e3 for f in (np.mean, _p99, max))
        lines.append(
            f"{'':8}  {kind:7} {'times' if kind == 'queue' else 'steps'} {len(seconds):5d}: "
            f"mean {mean:6.1f}, p99 {p99:6.1f}, max {most:6.1f}"
        )
    return "\n".join(lines)


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace-dir", type=Path, required=True, help="holds the Azure CSVs")
    parser.add_argument("--trace", choices=sorted(TRACES), default="conv")
    parser.add_argument(
        "--budgets",
        default="off,256,64",
        help="tokens a step (N, or N-M: long outputs M) or off, each optionally +backfill",
    )
    parser.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals a second")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--length-scale", type=float, default=0.125)
    parser.add_argument("--kv-cache-mb", type=float, default=4.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--engine-policy", default="memory_aware")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the budgets")
    args = parser.parse_args()
    try:  # every budget checked before the runs: N, N-M or off, each optionally +backfill
        budgets = {budget: parse_budget(budget) for budget in args.budgets.split(",")}
        policies = {
            budget: PolicyConfig(EnginePolicy(args.engine_policy), backfill=backfill)
            for budget, (_, _, backfill) in budgets.items()
        }
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    torch.set_num_threads(1)
    rows = load_trace(
        args.trace_dir / TRACES[args.trace], length_scale=args.length_scale, limit=args.requests
    )
    rng = random.Random(args.seed)
    gaps_s = [rng.expovariate(args.rate) for _ in rows]
    print(
        f"{args.trace}: {len(rows)} requests, Poisson {args.rate:g}/s, lengths x"
        f"{args.length_scale}, 1 engine x 1 thread, {args.engine_policy}, KV "
        f"{args.kv_cache_mb} MiB, batch {args.max_batch_size}; ms"
    )
    head = ("budget", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "p99/p50", "gap p99")
    print("".join(f"{h:>10}" if i else f"{h:>8}" for i, h in enumerate(head)))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(str(build_tiny_llama(Path(tmp) / "tiny-llama")))
        for budget in args.budgets.split(",") * args.repeats:  # interleaved: same noise
            fixed, long, _ = budgets[budget]  # N, N-M (a long-output budget M) or off
            config = EngineConfig(
                max_batch_size=args.max_batch_size,
                kv_capacity_bytes=int(args.kv_cache_mb * 2**20),
                max_tokens_per_step=fixed,
                long_output_tokens_per_step=long,
                policy=policies[budget],
            )
            print(report(budget, *replay(loaded, config, rows, gaps_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
