"""Workload planning: parsing, seeded determinism, Poisson arrivals, trace scaling, clamping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from exegpt.bench.workload_plan import (
    DEFAULT_TASK_NUM_REQUESTS,
    FIRST_PROMPT_TOKEN_ID,
    PlannedRequest,
    PlanOptions,
    WorkloadKind,
    WorkloadSpec,
    build_plan,
    clamp_to_context,
    parse_workload,
    poisson_arrivals,
    prompt_token_ids,
)
from exegpt.workloads import get_task

TASK_S = WorkloadSpec(WorkloadKind.TASK, "S")

# Four requests 0.0, 0.5, 1.5 and 3.0 s apart from the first; fractional digits as in Azure's.
TRACE_ROWS = [
    ("2023-11-16 18:15:46.0000000", 100, 10),
    ("2023-11-16 18:15:46.5000000", 31, 7),
    ("2023-11-16 18:15:47.5000000", 2000, 300),
    ("2023-11-16 18:15:49.0000000", 1, 1),
]


@pytest.fixture()
def trace_path(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{stamp},{inp},{out}" for stamp, inp, out in TRACE_ROWS]
    path.write_text("\n".join(lines) + "\n")
    return path


def _lengths(plan: list[PlannedRequest]) -> list[tuple[int, int]]:
    return [(r.input_tokens, r.output_tokens) for r in plan]


def test_parse_workload_accepts_tasks_and_traces(trace_path: Path) -> None:
    assert parse_workload("task:c1") == WorkloadSpec(WorkloadKind.TASK, "C1")
    assert parse_workload(f"trace:{trace_path}") == WorkloadSpec(
        WorkloadKind.TRACE, str(trace_path)
    )
    assert str(parse_workload("task:S")) == "task:S"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task:X", "unknown task 'X'"),
        ("bogus:S", "unknown workload kind 'bogus'"),
        ("S", "unknown workload 'S'"),
        ("task:", "unknown workload"),
        ("trace:/no/such/trace.csv", "trace file not found"),
    ],
)
def test_parse_workload_rejects_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_workload(text)


def test_task_plan_is_seeded_and_deterministic() -> None:
    first = build_plan(TASK_S, PlanOptions(num_requests=50, seed=7))
    assert first == build_plan(TASK_S, PlanOptions(num_requests=50, seed=7))
    assert _lengths(first) != _lengths(build_plan(TASK_S, PlanOptions(num_requests=50, seed=8)))
    # The rate draws from its own stream: the same seed keeps the same lengths.
    paced = build_plan(TASK_S, PlanOptions(num_requests=50, seed=7, rate_per_s=5.0))
    assert _lengths(paced) == _lengths(first)


def test_task_plan_lengths_follow_the_task() -> None:
    task = get_task("S")
    plan = build_plan(TASK_S, PlanOptions(num_requests=2000, seed=1))
    inputs = np.array([r.input_tokens for r in plan])
    outputs = np.array([r.output_tokens for r in plan])
    assert [r.index for r in plan] == list(range(2000))
    assert 1 <= inputs.min() and inputs.max() <= task.input.max_tokens
    assert 1 <= outputs.min() and outputs.max() <= task.output.max_tokens
    # Truncation on [1, 80] pulls the output mean of (32, 13) only slightly.
    assert abs(outputs.mean() - 32) < 2
    assert len(build_plan(TASK_S, PlanOptions())) == DEFAULT_TASK_NUM_REQUESTS


def test_length_scale_applies_to_tasks() -> None:
    full = build_plan(TASK_S, PlanOptions(num_requests=100, seed=3))
    tenth = build_plan(TASK_S, PlanOptions(num_requests=100, seed=3, length_scale=0.1))
    for big, small in zip(full, tenth, strict=True):
        assert small.input_tokens == max(1, math.ceil(big.input_tokens * 0.1))
        assert small.output_tokens == max(1, math.ceil(big.output_tokens * 0.1))


def test_task_default_rate_sends_everything_at_once() -> None:
    plan = build_plan(TASK_S, PlanOptions(num_requests=20))
    assert all(r.arrival_s == 0.0 for r in plan)
    assert not poisson_arrivals(5, math.inf, seed=0).any()


def test_poisson_arrivals_have_the_requested_rate() -> None:
    arrivals = poisson_arrivals(20000, rate_per_s=40.0, seed=5)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and (gaps >= 0).all()
    assert len(arrivals) / arrivals[-1] == pytest.approx(40.0, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert (arrivals == poisson_arrivals(20000, 40.0, seed=5)).all()


def test_trace_plan_scales_times_and_lengths(trace_path: Path) -> None:
    spec = WorkloadSpec(WorkloadKind.TRACE, str(trace_path))
    plan = build_plan(spec, PlanOptions())
    assert [r.arrival_s for r in plan] == pytest.approx([0.0, 0.5, 1.5, 3.0])
    assert _lengths(plan) == [(100, 10), (31, 7), (2000, 300), (1, 1)]
    scaled = build_plan(spec, PlanOptions(trace_time_scale=0.5, length_scale=0.25))
    assert [r.arrival_s for r in scaled] == pytest.approx([0.0, 0.25, 0.75, 1.5])
    # ceil(x / 4), never below one token.
    assert _lengths(scaled) == [(25, 3), (8, 2), (500, 75), (1, 1)]
    assert len(build_plan(spec, PlanOptions(num_requests=2))) == 2


def test_trace_with_rate_keeps_lengths_and_replaces_timestamps(trace_path: Path) -> None:
    spec = WorkloadSpec(WorkloadKind.TRACE, str(trace_path))
    plan = build_plan(spec, PlanOptions(rate_per_s=math.inf))
    assert _lengths(plan) == [(100, 10), (31, 7), (2000, 300), (1, 1)]
    assert all(r.arrival_s == 0.0 for r in plan)


def test_clamping_fits_the_context_and_keeps_outputs_when_it_can() -> None:
    plan = [
        PlannedRequest(0, 0.0, 90, 20),  # input gives way: 80 + 20
        PlannedRequest(1, 0.0, 50, 50),  # fits exactly
        PlannedRequest(2, 0.0, 10, 200),  # output alone is too long: 1 + 99
        PlannedRequest(3, 0.0, 5, 5),
    ]
    result = clamp_to_context(plan, max_model_len=100)
    assert _lengths(result.requests) == [(80, 20), (50, 50), (1, 99), (5, 5)]
    assert result.num_clamped == 2
    assert [r.index for r in result.requests] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_model_len"):
        clamp_to_context(plan, max_model_len=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PlanOptions(num_requests=0), "--num-requests must be positive"),
        (PlanOptions(rate_per_s=0.0), "--rate must be positive"),
        (PlanOptions(rate_per_s=-1.0), "--rate must be positive"),
        (PlanOptions(rate_per_s=math.nan), "--rate must be positive"),
        (PlanOptions(length_scale=0.0), "--length-scale must be positive"),
        (PlanOptions(trace_time_scale=2.0), "applies to trace workloads only"),
        (PlanOptions(trace_time_scale=-1.0), "--trace-time-scale must be positive"),
        (PlanOptions(trace_time_scale=2.0, rate_per_s=1.0), "not both"),
    ],
)
def test_bad_options_are_rejected(options: PlanOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_plan(TASK_S, options)


def test_prompt_token_ids_are_seeded_and_in_range() -> None:
    prompt = prompt_token_ids(index=4, num_tokens=500, vocab_size=10, seed=1)
    assert len(prompt) == 500
    assert set(prompt) == set(range(FIRST_PROMPT_TOKEN_ID, 10))
    assert prompt == prompt_token_ids(4, 500, 10, seed=1)
    assert prompt != prompt_token_ids(5, 500, 10, seed=1)
    with pytest.raises(ValueError, match="vocab_size"):
        prompt_token_ids(0, 5, vocab_size=3, seed=0)
