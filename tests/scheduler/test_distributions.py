"""Workload distributions P_E(S), P_D(S): tasks, traces, observed lengths, p99."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exegpt.workloads import TASKS
from services.scheduler.problem import WorkloadDistribution
from services.scheduler.simulator.common import WorkloadStats


@pytest.mark.parametrize("task_id", list(TASKS))
def test_tasks_are_truncated_normals_with_the_papers_p99(task_id: str) -> None:
    task = TASKS[task_id]
    workload = WorkloadDistribution.from_task(task_id)
    assert workload.max_input_tokens == task.input.max_tokens
    assert workload.max_output_tokens == task.output.max_tokens
    assert workload.input_pmf.sum() == pytest.approx(1.0)
    # The latency bound uses the paper's stated p99; the truncated normal's own 99th
    # percentile is close to it but lower (the paper's outputs have a heavier tail).
    assert workload.output_p99_tokens == task.output_p99_tokens
    pmf_p99 = workload.output_quantile_tokens(0.99)
    assert task.output_p99_tokens * 0.9 <= pmf_p99 <= task.output_p99_tokens
    # Truncation at 1 and at the maximum moves the mean a little.
    assert workload.mean_output_tokens == pytest.approx(task.output.mean_tokens, rel=0.1)


def test_observed_lengths_give_an_empirical_distribution() -> None:
    workload = WorkloadDistribution.from_lengths("observed", [4, 4, 8, 8], [1] * 99 + [50])
    assert workload.mean_input_tokens == pytest.approx(6.0)
    assert workload.input_pmf[4] == pytest.approx(0.5)
    assert workload.output_quantile_tokens(0.99) == 1
    assert workload.output_quantile_tokens(0.995) == 50
    assert workload.output_p99_tokens == 1


def test_trace_lengths(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:17:0{i}.0000000,{100 * (i + 1)},{10 * (i + 1)}" for i in range(5)]
    trace.write_text("\n".join(rows) + "\n")
    workload = WorkloadDistribution.parse(f"trace:{trace}")
    assert workload.mean_input_tokens == pytest.approx(300.0)
    assert workload.max_output_tokens == 50
    clamped = WorkloadDistribution.parse(f"trace:{trace}", max_context_tokens=250)
    assert clamped.max_input_tokens == 250
    scaled = WorkloadDistribution.parse(f"trace:{trace}", length_scale=0.1)
    assert scaled.mean_input_tokens == pytest.approx(30.0)
    assert scaled.max_output_tokens == 5 and "x0.1" in scaled.name
    with pytest.raises(ValueError, match="positive"):
        WorkloadDistribution.parse(f"trace:{trace}", length_scale=-1.0)
    with pytest.raises(ValueError, match="trace workloads"):
        WorkloadDistribution.parse("task:S", length_scale=0.5)


@pytest.mark.parametrize("spec", ["task:X", "tsk:S", "task:", "S", "trace:/no/such/file.csv"])
def test_unknown_workloads_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        WorkloadDistribution.parse(spec)


def test_bad_pmfs_are_rejected() -> None:
    with pytest.raises(ValueError, match="sum"):
        WorkloadDistribution("bad", np.array([0.0, 0.5]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="length 0"):
        WorkloadDistribution("bad", np.array([0.5, 0.5]), np.array([0.0, 1.0]))


def test_stats_for_the_simulator() -> None:
    input_pmf = np.array([0.0, 0.0, 0.5, 0.0, 0.5])  # 2 or 4 tokens: E[S^2] = 10
    output_pmf = np.array([0.0, 0.0, 0.5, 0.0, 0.5])
    stats = WorkloadStats.from_workload(WorkloadDistribution("w", input_pmf, output_pmf))
    assert stats.attention_input_tokens == round(np.sqrt(10))
    # Length-biased: a running sequence is 4 long with weight 4 * 0.5, so E[pos] = 13 / 6.
    assert stats.running_position_tokens == pytest.approx(13 / 6)
    assert stats.output_p99_tokens == 4
