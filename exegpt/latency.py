"""What "latency" means in exegpt, predicted and measured alike: one definition.

The planner's latency is the **p99-length latency**: the generation latency of a request
whose output is at the 99th percentile of output lengths. A request's **generation latency**
runs from its first admission into a batch (the start of its encoding) to its last token.
It counts the prefill (for a static batch, the whole batch's prefill), every decode step and
the serving path after admission; it leaves out the time the request queued before it was
admitted, which at saturation says how long the burst is, not how the schedule serves.

Measured, it is read the same way on both sides:

- the engine (GET /schedule): from the request's first admission to its last token;
- a client (`exegpt bench`): the admission-to-last-token seconds the engine reports with
  the last chunk (gRPC `Usage.generation_s`, HTTP `usage.exegpt_generation_s`). End to end
  minus the queue seconds would also hold a burst's backlog in the client, the gateway and
  the router before the engine received the request.

The p99-length latency of measured requests is the mean generation latency of those whose
output is at the p99 output length (a short run with fewer of them reads it off the line of
latency against length through its longer half of requests). Not of those beyond it: they
are the 1% of requests the promise leaves out, and a schedule's latency need not be linear
there. An RRA schedule whose N_D decode iterations just cover the p99 length runs a longer
request's last steps after the next encoding, so its latency jumps past the p99 length (task
C1: 9.3 s at 28-36 tokens, 13.2-14.4 s at 37-40, p99 34); a mean over the tail would read that
jump as the p99-length request's latency, though that request finishes within the cycle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

P99 = 0.99
MIN_TAIL = 3  # requests at the p99 length needed to average them alone


@dataclass(frozen=True)
class Generation:
    """One finished request as the latency definition reads it."""

    output_tokens: int
    latency_s: float  # first admission to last token


def p99_length(output_tokens: Iterable[int]) -> int:
    """The 99th-percentile output length (nearest rank); 0 without outputs."""
    lengths = sorted(output_tokens)
    if not lengths:
        return 0
    return lengths[max(0, math.ceil(P99 * len(lengths)) - 1)]


def p99_length_latency(
    generations: list[Generation], p99_tokens: int | None = None
) -> tuple[float, int]:
    """(the p99-length latency of these requests, the p99 length); (nan, 0) without any.

    `p99_tokens` is the workload's p99 length (what a prediction is for); None reads it
    from `generations`. The latency is the mean of the requests at that length. When fewer
    than MIN_TAIL have it (a short run), it is read off the least-squares line of latency
    against output length, at that length: a request's generation latency is its encoding
    plus one step per output token, so the line holds the same quantity with more requests'
    evidence. The line runs through the longer half of the requests
    (at or beyond the median length; all of them when that half does not rise): in a static
    batch a request's early steps run beside more rows than its late ones, so latency is
    concave in length, and a line through the short requests overstates the long ones
    (by 7% on average over 15 static runs of benchmarks/fidelity.py; continuous batching,
    linear in length, reads the same either way).
    """
    if not generations:
        return math.nan, 0
    length = p99_length(g.output_tokens for g in generations) if p99_tokens is None else p99_tokens
    at_length = [g.latency_s for g in generations if g.output_tokens == length]
    if len(at_length) < MIN_TAIL:
        on_line = line_at(longer_half(generations), length) or line_at(generations, length)
        if on_line is not None:
            return on_line, length
    if not at_length:  # too noisy for a line: the longest stand in
        longest = max(g.output_tokens for g in generations)
        at_length = [g.latency_s for g in generations if g.output_tokens == longest]
    return sum(at_length) / len(at_length), length


def longer_half(generations: list[Generation]) -> list[Generation]:
    """The requests at or beyond the median output length (the lower median)."""
    lengths = sorted(g.output_tokens for g in generations)
    median = lengths[(len(lengths) - 1) // 2]
    return [g for g in generations if g.output_tokens >= median]


def line_at(generations: list[Generation], output_tokens: int) -> float | None:
    """The least-squares line of latency against output length, at `output_tokens`; None
    when it does not rise with length (one length only, or noise)."""
    n = len(generations)
    mean_x = sum(g.output_tokens for g in generations) / n
    mean_y = sum(g.latency_s for g in generations) / n
    sxx = sum((g.output_tokens - mean_x) ** 2 for g in generations)
    sxy = sum((g.output_tokens - mean_x) * (g.latency_s - mean_y) for g in generations)
    if sxx <= 0 or sxy <= 0:
        return None
    return mean_y + sxy / sxx * (output_tokens - mean_x)
