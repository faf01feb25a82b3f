"""Turn a workload spec into planned requests: arrival time, input length, forced output length.

Pure and seeded: the same spec and options give the same plan. Lengths, arrival gaps and prompt
token ids use independent random streams derived from one seed, so changing the rate does not
change the lengths, and a request's prompt does not depend on the order requests are sent in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import numpy as np

from exegpt.workloads import TASKS, get_task, load_trace, scale_length

DEFAULT_TASK_NUM_REQUESTS = 500
# Token ids below this are special in the models exegpt serves (pad, eos, unk / bos).
FIRST_PROMPT_TOKEN_ID = 3
TRACE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Azure/AzurePublicDataset), CC-BY 4.0. "
    'Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini, "Splitwise: Efficient generative '
    'LLM inference using phase splitting", ISCA 2024.'
)

# Sub-streams of the seed, so each kind of randomness is independent of the others.
_LENGTH_STREAM, _ARRIVAL_STREAM, _PROMPT_STREAM = 0, 1, 2


class WorkloadKind(StrEnum):
    TASK = "task"
    TRACE = "trace"


@dataclass(frozen=True)
class WorkloadSpec:
    kind: WorkloadKind
    target: str  # the task id (upper case) or the trace file path

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class PlanOptions:
    # None: DEFAULT_TASK_NUM_REQUESTS for a task, every row for a trace.
    num_requests: int | None = None
    # Poisson arrivals at this rate (math.inf: all at once). None: inf for a task, the trace's
    # own timestamps for a trace.
    rate_per_s: float | None = None
    # Multiplies a trace's arrival times (0.1 replays ten times faster). None: 1.0.
    trace_time_scale: float | None = None
    length_scale: float = 1.0
    seed: int = 0

    def validate(self, spec: WorkloadSpec) -> None:
        if self.num_requests is not None and self.num_requests <= 0:
            raise ValueError(f"--num-requests must be positive, got {self.num_requests}")
        if self.rate_per_s is not None and not self.rate_per_s > 0:
            raise ValueError(f"--rate must be positive (or inf), got {self.rate_per_s}")
        time_scale = self.trace_time_scale
        if time_scale is not None:
            if not (time_scale > 0 and math.isfinite(time_scale)):
                raise ValueError(f"--trace-time-scale must be positive, got {time_scale}")
            if self.rate_per_s is not None:
                raise ValueError("give either --rate or --trace-time-scale, not both")
            if spec.kind is not WorkloadKind.TRACE:
                raise ValueError("--trace-time-scale applies to trace workloads only")
        if not (self.length_scale > 0 and math.isfinite(self.length_scale)):
            raise ValueError(f"--length-scale must be positive, got {self.length_scale}")


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    arrival_s: float  # since the start of the run
    input_tokens: int
    output_tokens: int  # forced: the request asks for exactly this many, ignoring EOS


@dataclass(frozen=True)
class ClampResult:
    requests: list[PlannedRequest]
    num_clamped: int


def parse_workload(text: str) -> WorkloadSpec:
    """Parse `task:S|T|G|C1|C2` or `trace:PATH`; raise ValueError with a readable message."""
    kind, sep, target = text.partition(":")
    expected = f"expected task:{'|'.join(TASKS)} or trace:PATH"
    if not sep or not target:
        raise ValueError(f"unknown workload {text!r}; {expected}")
    if kind == WorkloadKind.TASK:
        return WorkloadSpec(WorkloadKind.TASK, get_task(target).task_id)
    if kind == WorkloadKind.TRACE:
        if not Path(target).is_file():
            raise ValueError(f"trace file not found: {target}")
        return WorkloadSpec(WorkloadKind.TRACE, target)
    raise ValueError(f"unknown workload kind {kind!r} in {text!r}; {expected}")


def build_plan(spec: WorkloadSpec, options: PlanOptions) -> list[PlannedRequest]:
    """The planned requests in arrival order, lengths scaled but not yet clamped."""
    options.validate(spec)
    if spec.kind is WorkloadKind.TASK:
        return _plan_task(spec.target, options)
    return _plan_trace(spec.target, options)


def _plan_task(task_id: str, options: PlanOptions) -> list[PlannedRequest]:
    task = get_task(task_id)
    num_requests = options.num_requests or DEFAULT_TASK_NUM_REQUESTS
    rng = np.random.default_rng([options.seed, _LENGTH_STREAM])
    inputs = task.input.sample(num_requests, rng)
    outputs = task.output.sample(num_requests, rng)
    rate_per_s = math.inf if options.rate_per_s is None else options.rate_per_s
    arrivals = poisson_arrivals(num_requests, rate_per_s, options.seed)
    return [
        PlannedRequest(
            index=i,
            arrival_s=float(arrivals[i]),
            input_tokens=scale_length(int(inputs[i]), options.length_scale, None),
            output_tokens=scale_length(int(outputs[i]), options.length_scale, None),
        )
        for i in range(num_requests)
    ]


def _plan_trace(path: str, options: PlanOptions) -> list[PlannedRequest]:
    time_scale = 1.0 if options.trace_time_scale is None else options.trace_time_scale
    rows = load_trace(
        path,
        time_scale=time_scale,
        length_scale=options.length_scale,
        limit=options.num_requests,
    )
    if options.rate_per_s is None:
        arrivals = [row.arrival_s for row in rows]
    else:  # the trace's lengths with synthetic arrivals
        arrivals = poisson_arrivals(len(rows), options.rate_per_s, options.seed).tolist()
    return [
        PlannedRequest(i, float(arrivals[i]), row.input_tokens, row.output_tokens)
        for i, row in enumerate(rows)
    ]


def poisson_arrivals(num_requests: int, rate_per_s: float, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process at rate_per_s, the first at 0; all 0 for inf."""
    if math.isinf(rate_per_s):
        return np.zeros(num_requests)
    rng = np.random.default_rng([seed, _ARRIVAL_STREAM])
    gaps_s = rng.exponential(1.0 / rate_per_s, size=num_requests)
    gaps_s[0] = 0.0
    return np.cumsum(gaps_s)


def clamp_to_context(requests: list[PlannedRequest], max_model_len: int) -> ClampResult:
    """Shorten requests so input + output fits the model's context.

    The output is kept whenever possible (it is the forced length the latency bound is about);
    the input gives way first, down to one token.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
    clamped: list[PlannedRequest] = []
    num_clamped = 0
    for request in requests:
        output_tokens = min(request.output_tokens, max_model_len - 1)
        input_tokens = min(request.input_tokens, max_model_len - output_tokens)
        if (input_tokens, output_tokens) != (request.input_tokens, request.output_tokens):
            num_clamped += 1
            request = replace(request, input_tokens=input_tokens, output_tokens=output_tokens)
        clamped.append(request)
    return ClampResult(clamped, num_clamped)


def prompt_token_ids(index: int, num_tokens: int, vocab_size: int, seed: int) -> list[int]:
    """The prompt of request `index`: ids uniform on [FIRST_PROMPT_TOKEN_ID, vocab_size)."""
    if vocab_size <= FIRST_PROMPT_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_PROMPT_TOKEN_ID}, got {vocab_size}")
    rng = np.random.default_rng([seed, _PROMPT_STREAM, index])
    return rng.integers(FIRST_PROMPT_TOKEN_ID, vocab_size, size=num_tokens).tolist()
