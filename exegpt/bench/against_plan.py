"""Measured against predicted: run `exegpt bench` at saturation and read what a plan predicts.

The simulator predicts steady state: sequences per second once the batch is full, and the
latency of a p99-output-length sequence from the start of its encoding to its last token.
A saturating burst (every request sent at once) also has a filling and a draining phase and
a queue, so the measured figures are read the same way:

- **throughput**: the completion rate in the steady window, which runs from the 10th to
  the 90th percentile completion time (the middle of the burst, at steady state) and ends
  no later than the admission of the burst's last request: after it the queue is empty and
  the batches drain, with shorter steps and bunched completions that no steady state has.
  The rate is the least-squares slope of the completions counted against their times, not
  the count between the window's ends: RRA and static batching finish their requests in
  bunches, one per cycle or batch, and a count between ends at different phases of the
  cycle is off by up to a bunch. (Admissions over whole batches would count static batches
  exactly, but admission times reconstructed on the client's clock carry its delivery
  jitter, which splits batches and reads high, so the completions stay.)
- **p99-length latency**: as exegpt/latency.py defines it, the mean generation latency of
  the requests that completed in that window at the workload's p99 output length
  (with too few of them there, the line of latency against length through the window's
  requests; never the burst's drain, where a shrinking batch runs faster).
  A request's generation latency is what the engine reported with its last chunk
  (`generation_s`): from its admission into a batch to its last token, its encoding (a
  static batch's whole prefill) included; queueing left out, as in the prediction (a
  burst's queue says how long the burst is, not how the schedule serves). The client's end
  to end minus the engine's queue seconds would also hold the burst's backlog in the
  client, the gateway and the router before the engine received the request.
"""

from __future__ import annotations

import bisect
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exegpt import latency
from exegpt.latency import Generation

STEADY_WINDOW = (0.1, 0.9)


@dataclass(frozen=True)
class Measured:
    throughput_seq_s: float
    p99_length_latency_s: float
    num_ok: int
    num_failed: int
    burst_throughput_seq_s: float  # the whole burst, fill and drain included


@dataclass(frozen=True)
class Comparison:
    predicted_seq_s: float
    measured_seq_s: float
    predicted_latency_s: float
    measured_latency_s: float
    bound_s: float | None

    @property
    def throughput_error(self) -> float:
        return relative_error(self.measured_seq_s, self.predicted_seq_s)

    @property
    def latency_error(self) -> float:
        return relative_error(self.measured_latency_s, self.predicted_latency_s)

    @property
    def meets_bound(self) -> bool | None:
        if self.bound_s is None or math.isinf(self.bound_s):
            return None
        return self.measured_latency_s <= self.bound_s


def relative_error(measured: float, predicted: float) -> float:
    return (measured - predicted) / predicted if predicted > 0 else math.nan


def bench_command(
    url: str,
    workload: str,
    num_requests: int,
    json_path: Path,
    length_scale: float | None,
    seed: int = 0,
) -> list[str]:
    scale = ["--length-scale", str(length_scale)] if length_scale is not None else []
    return [
        sys.executable, "-m", "exegpt.bench", "--url", url, "--workload", workload,
        "--num-requests", str(num_requests), "--rate", "inf", *scale, "--seed", str(seed),
        "--json", str(json_path),
    ]  # fmt: skip


def run_bench(
    url: str,
    workload: str,
    num_requests: int,
    json_path: Path,
    length_scale: float | None,
    seed: int = 0,
) -> dict[str, Any]:
    """`exegpt bench` at saturation against `url`; its JSON document (requests included).
    `seed` seeds its lengths and prompts (`exegpt bench --seed`)."""
    command = bench_command(url, workload, num_requests, json_path, length_scale, seed)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(json_path.read_text())


def measure(document: dict[str, Any], p99_output_tokens: int) -> Measured:
    """Steady-state throughput and the p99-length latency of a bench document."""
    rows = completed_rows(document)
    metrics = document["metrics"]
    burst = float(metrics["throughput"]["sequences_per_s"])
    if not rows:
        return Measured(0.0, math.nan, 0, int(metrics["num_failed"]), burst)
    ends = sorted(r["send_s"] + r["e2e_s"] for r in rows)
    window = _window(ends, last_admission_s(rows))
    first, last = window or (ends[0], ends[-1])
    steady = [r for r in rows if first <= r["send_s"] + r["e2e_s"] <= last]
    return Measured(
        throughput_seq_s=_completions_per_s(ends, window) or burst,
        p99_length_latency_s=p99_length_latency(rows, steady, p99_output_tokens),
        num_ok=len(rows),
        num_failed=int(metrics["num_failed"]),
        burst_throughput_seq_s=burst,
    )


def completed_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """A bench document's requests that completed without an error."""
    return [r for r in document["requests"] if r["error"] is None and r["e2e_s"] is not None]


def steady_rate(rows: list[dict[str, Any]]) -> float | None:
    """Completions per second of a burst's completed `rows` in the steady window that ends
    when the last of them was admitted (`measure`'s throughput); None with fewer than 3
    completions in any window."""
    ends = sorted(r["send_s"] + r["e2e_s"] for r in rows)
    return _completions_per_s(ends, _window(ends, last_admission_s(rows)))


def last_admission_s(rows: list[dict[str, Any]]) -> float | None:
    """When the engines admitted the burst's last request (client clock: its completion less
    its admission-to-last-token seconds); None without the engine's generation_s."""
    admitted = [
        r["send_s"] + r["e2e_s"] - s for r in rows if (s := generation_latency_s(r)) is not None
    ]
    return max(admitted) if admitted else None


def steady_window(
    end_times_s: list[float], queued_until_s: float | None = None
) -> tuple[float, float] | None:
    """(first, last) completion times of the steady window: between the window's quantiles,
    and no later than `queued_until_s`, when the last request was admitted. After it the
    queue is empty and the batches drain: steps shrink and completions bunch up (a burst of
    4 running batches per replica finishes a quarter of its requests there), which no
    steady state does. None when fewer than 3 completions lie in it."""
    ends = sorted(end_times_s)
    first = int(STEADY_WINDOW[0] * (len(ends) - 1))
    last = int(STEADY_WINDOW[1] * (len(ends) - 1))
    if queued_until_s is not None:
        last = min(last, bisect.bisect_right(ends, queued_until_s) - 1)
    if last - first < 2 or ends[last] <= ends[first]:
        return None
    return ends[first], ends[last]


def steady_throughput(
    end_times_s: list[float], queued_until_s: float | None = None
) -> float | None:
    """Completions per second in the steady window (`steady_window`; without one that ends
    by `queued_until_s`, the window's quantiles alone)."""
    ends = sorted(end_times_s)
    return _completions_per_s(ends, _window(ends, queued_until_s))


def _window(ends: list[float], queued_until_s: float | None) -> tuple[float, float] | None:
    """The steady window that ends by `queued_until_s`, else the quantiles' alone."""
    return steady_window(ends, queued_until_s) or steady_window(ends)


def _completions_per_s(ends: list[float], window: tuple[float, float] | None) -> float | None:
    """Completions per second in `window` of the sorted completion times `ends`: the slope
    of the completions counted against time (least squares), not the count between the
    window's ends. RRA and static batching finish their requests in bunches, one per cycle,
    and a window that opens at one bunch's start and closes at another's end holds a bunch
    more than its cycles deliver: task S's RRA read 137.9 seq/s where its cycles (about
    6.8 s for 750 requests over both replicas) give 110, the slope 108. A steady stream
    reads within a few percent either way, not the same (the continuous data-parallel
    baseline read 149.5 by count, 145.6 by slope). With few cycles in the window the slope
    reads a bunched schedule a few percent off: low at 4, 6 and 8 cycles per replica (about
    5% at 4, 1% at 8), but at 5 cycles about half the phases of the replicas' bunches read
    high, up to +1.4% (the second replica 1.0-1.9 s of a 2 s cycle behind). None with
    fewer than 3 completions in the window."""
    if window is None:
        return None
    first, last = window
    times = ends[bisect.bisect_left(ends, first) : bisect.bisect_right(ends, last)]
    if len(times) < 3:
        return None
    mean_s = sum(times) / len(times)
    mean_index = (len(times) - 1) / 2
    spread = sum((t - mean_s) ** 2 for t in times)
    if spread <= 0:
        return None
    return sum((t - mean_s) * (i - mean_index) for i, t in enumerate(times)) / spread


def generation_latency_s(row: dict[str, Any]) -> float | None:
    """A bench row's admission-to-last-token seconds, as the engine measured them; None
    when the server did not report them (no exegpt engine behind the URL)."""
    return row.get("generation_s")


def p99_length_latency(
    rows: list[dict[str, Any]], steady: list[dict[str, Any]], p99_output_tokens: int
) -> float:
    """The p99-length latency (exegpt/latency.py) of the steady window's rows (with too few
    at the p99 length, their line of latency against length); of the whole burst's only when
    the window holds fewer than two; nan without the engine's generation_s. The burst's own
    tail is no stand-in: its last requests run in the drain, beside a shrinking batch, faster
    than at steady state (task S at batch 16 read 0.54 s from two of them, 0.72 s on the
    window's line)."""
    window = _generations(steady)
    generations = window if len(window) >= 2 else _generations(rows)
    return latency.p99_length_latency(generations, p99_output_tokens)[0]


def _generations(rows: list[dict[str, Any]]) -> list[Generation]:
    return [
        Generation(r["output_tokens"], s)
        for r in rows
        if (s := generation_latency_s(r)) is not None
    ]


def compare(predicted: dict[str, Any], measured: Measured, bound_s: float | None) -> Comparison:
    return Comparison(
        predicted_seq_s=float(predicted["throughput_seq_s"]),
        measured_seq_s=measured.throughput_seq_s,
        predicted_latency_s=float(predicted["latency_s"]),
        measured_latency_s=measured.p99_length_latency_s,
        bound_s=bound_s,
    )


def percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 100:+.0f}%"
