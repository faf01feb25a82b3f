"""benchmarks/two_level.py offers its loads as fractions of the baseline's capacity: the
steady-window completion rate of its burst (what it sustains), not the burst's requests over
its whole run (fill and drain included); hand-made bench documents, no timing."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as the benchmark scripts put their folder first
TWO_LEVEL = runpy.run_path(str(BENCHMARKS / "two_level.py"), run_name="two_level")
POLICY_RUNS = runpy.run_path(str(BENCHMARKS / "policy_runs.py"), run_name="policy_runs")


def _row(end_s: float, generation_s: float) -> dict:
    """A request of the burst (sent at 0) that completed at `end_s`, `generation_s` after
    the engine admitted it."""
    return {"send_s": 0.0, "ttft_s": 0.1, "e2e_s": end_s, "output_tokens": 10,
            "queue_s": end_s - generation_s, "generation_s": generation_s,
            "error": None}  # fmt: skip


def _document(rows: list[dict]) -> dict:
    """A bench JSON document whose whole-run throughput is what `exegpt bench` reports:
    the completed requests over the last completion (every request sent at 0)."""
    whole = len(rows) / max(r["e2e_s"] for r in rows)
    return {"requests": rows, "metrics": {"throughput": {"sequences_per_s": whole}}}


def test_the_capacity_is_the_bursts_steady_window_rate() -> None:
    # Nothing completes in the first second (the first batch fills), then 60 requests
    # complete at 10 per second, each admitted 1 s before it completes (the last at 5.9 s);
    # the last 20 are admitted by 6.19 s and drain slowly, one every 0.2 s up to 10.8 s.
    steady = [_row(1.0 + 0.1 * i, 1.0) for i in range(60)]
    drain = [_row(7.0 + 0.2 * j, 1.0 + 0.19 * j) for j in range(20)]
    metrics = POLICY_RUNS["report_metrics"](_document(steady + drain))
    # Completions 7..51 of 80 (the 10th percentile, up to the last admission at 6.19 s):
    # 44 in 6.1 - 1.7 = 4.4 s.
    assert metrics["steady_sequences_per_s"] == pytest.approx(10.0)
    assert TWO_LEVEL["capacity_seq_s"](metrics) == pytest.approx(10.0)
    # The whole run's 80 / 10.8 s = 7.4 per second stays in the report, and is not used.
    assert metrics["throughput"]["sequences_per_s"] == pytest.approx(80 / 10.8)


def test_without_a_steady_window_the_capacity_is_the_whole_bursts_rate() -> None:
    # Two completions hold no window of 3: the whole run's 2 per second is all there is.
    metrics = POLICY_RUNS["report_metrics"](_document([_row(0.5, 0.5), _row(1.0, 1.0)]))
    assert metrics["steady_sequences_per_s"] is None
    assert TWO_LEVEL["capacity_seq_s"](metrics) == pytest.approx(2.0)
