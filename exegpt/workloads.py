"""Workloads: the ExeGPT paper's five tasks and the Azure request traces.

A task draws input and output lengths from truncated normal distributions
(docs/design.md section 4); a trace replays real arrival times and lengths, scaled to what
the machine can serve.
Both the benchmark client and the scheduler's distributions read lengths from here.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class LengthSpec:
    """A truncated normal length distribution on the integers [min_tokens, max_tokens]."""

    mean_tokens: float
    std_tokens: float
    max_tokens: int
    min_tokens: int = 1

    def pmf(self) -> np.ndarray:
        """P(S) for S = 0..max_tokens (index = length); zero below min_tokens, sums to 1."""
        lengths = np.arange(self.max_tokens + 1)
        # Probability mass of [S - 0.5, S + 0.5) under the normal, then renormalised on the support.
        upper = stats.norm.cdf(lengths + 0.5, self.mean_tokens, self.std_tokens)
        lower = stats.norm.cdf(lengths - 0.5, self.mean_tokens, self.std_tokens)
        mass = np.where(lengths >= self.min_tokens, upper - lower, 0.0)
        return mass / mass.sum()

    def sample(self, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        """Integer lengths drawn from pmf()."""
        pmf = self.pmf()
        return rng.choice(len(pmf), size=num_samples, p=pmf).astype(np.int64)


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    name: str
    input: LengthSpec
    output: LengthSpec
    # The paper's 99th-percentile output length, which defines the latency bound L_B.
    output_p99_tokens: int


TASKS: dict[str, TaskSpec] = {
    "S": TaskSpec("S", "summarization", LengthSpec(256, 252, 512), LengthSpec(32, 13, 80), 63),
    "T": TaskSpec("T", "translation", LengthSpec(128, 81, 256), LengthSpec(128, 68, 320), 292),
    "G": TaskSpec("G", "code generation", LengthSpec(64, 23, 128), LengthSpec(192, 93, 480), 417),
    "C1": TaskSpec(
        "C1", "conversational Q&A", LengthSpec(256, 115, 512), LengthSpec(64, 30, 160), 137
    ),
    "C2": TaskSpec(
        "C2", "conversational Q&A", LengthSpec(512, 252, 1024), LengthSpec(256, 134, 640), 579
    ),
}


def get_task(task_id: str) -> TaskSpec:
    try:
        return TASKS[task_id.upper()]
    except KeyError:
        known = ", ".join(TASKS)
        raise ValueError(f"unknown task {task_id!r}; known tasks: {known}") from None


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int


def scale_length(tokens: int, length_scale: float, max_tokens: int | None) -> int:
    """Multiply a length by length_scale, keep it >= 1 and clamp it to max_tokens."""
    scaled = max(1, math.ceil(tokens * length_scale))
    return min(scaled, max_tokens) if max_tokens is not None else scaled


def load_trace(
    path: str | Path,
    *,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    limit: int | None = None,
) -> list[TraceRequest]:
    """Read an Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens).

    Arrival times start at 0 and are multiplied by time_scale (0.1 replays ten times faster);
    token counts are multiplied by length_scale and clamped to the given maxima.
    """
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError("time_scale and length_scale must be positive")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {path}")
    requests: list[TraceRequest] = []
    start: datetime | None = None
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a trace file, missing columns {sorted(missing)}")
        for row in reader:
            if limit is not None and len(requests) >= limit:
                break
            try:
                stamp = _parse_timestamp(row["TIMESTAMP"])
                num_input, num_output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError, AttributeError):
                # Say where, never what: a trace path may come from a remote client.
                raise ValueError(
                    f"{path}: line {reader.line_num}: malformed TIMESTAMP, ContextTokens "
                    "or GeneratedTokens"
                ) from None
            start = start or stamp
            requests.append(
                TraceRequest(
                    arrival_s=(stamp - start).total_seconds() * time_scale,
                    input_tokens=scale_length(num_input, length_scale, max_input_tokens),
                    output_tokens=scale_length(num_output, length_scale, max_output_tokens),
                )
            )
    if not requests:
        raise ValueError(f"{path}: trace has no requests")
    return requests


def _parse_timestamp(text: str) -> datetime:
    # The traces carry 7 fractional digits; datetime takes at most 6.
    head, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6].ljust(6, '0')}")
