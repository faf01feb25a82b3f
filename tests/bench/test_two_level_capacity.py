"""benchmarks/two_level.py offers its loads as fractions of the baseline's capacity: the
steady-window completion rate of its burst (what it sustains), not the burst's requests over
its whole run (fill and drain included); its burst follows the measured-burst rule, and its
repeats pool their requests for the tails. Hand-made bench documents, no timing."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from exegpt.bench.burst import measured_burst

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


def _timed_row(ttft_s: float, e2e_s: float, output_tokens: int, error: str | None = None) -> dict:
    return {"send_s": 0.0, "ttft_s": ttft_s, "e2e_s": e2e_s, "output_tokens": output_tokens,
            "queue_s": 0.0, "generation_s": e2e_s, "error": error}  # fmt: skip


def _replay(rows: list[dict], seq_s: float, preemptions: int) -> dict:
    """A replay's metrics as policy_runs.replay returns them (only what combine reads)."""
    return {"rows": rows, "throughput": {"sequences_per_s": seq_s}, "preemptions": preemptions,
            "latency_bound_s": 1.0, "ttft_s": {"p99": 99.0}}  # fmt: skip


def test_repeats_pool_their_requests_for_the_latency_percentiles() -> None:
    # Replay A: 100 fast requests; replay B: 98 fast, one slow and one failed. Each replay's
    # own p99 would be its slowest request; the pool's is a statistic of all 200.
    fast = [_timed_row(0.1, 0.5, 5) for _ in range(98)]
    slow = _timed_row(2.0, 3.0, 3)
    a = _replay([*fast, *fast[:2]], seq_s=10.0, preemptions=2)
    b = _replay([*fast, slow, _timed_row(0.1, 0.2, 1, error="boom")], seq_s=12.0, preemptions=3)
    combined = POLICY_RUNS["combine"]([a, b])
    ttfts = [0.1] * 198 + [2.0]  # the failed request has no TTFT
    assert combined["ttft_s"]["p99"] == pytest.approx(np.percentile(ttfts, 99))
    assert combined["ttft_s"]["p50"] == pytest.approx(0.1)
    # TPOT: (0.5 - 0.1) / 4 = 0.1 for the fast, (3 - 2) / 2 = 0.5 for the slow one.
    tpots = [0.1] * 198 + [0.5]
    assert combined["tpot_s"]["p99"] == pytest.approx(np.percentile(tpots, 99))
    assert combined["tpot_p99_over_p50"] == pytest.approx(np.percentile(tpots, 99) / 0.1)
    assert combined["num_pooled"] == 200 and combined["num_failed"] == 1
    # Within the 1 s bound: all but the slow and the failed one, over all 200.
    assert combined["fraction_within_bound"] == pytest.approx(198 / 200)
    assert combined["num_within_bound"] == 198
    assert combined["throughput"]["sequences_per_s"] == pytest.approx(11.0)  # the median
    assert combined["preemptions"] == 5  # summed


def test_the_capacity_burst_follows_the_measured_burst_rule() -> None:
    args = argparse.Namespace(max_batch_size=16, requests_per_cell=200, length_scale=0.125, seed=7)
    # 4 running batches of 16 on each of the 2 replicas; no predicted rate before it.
    assert TWO_LEVEL["burst_size"](args) == 128 == measured_burst(2 * 16, 0.0)
    burst = TWO_LEVEL["bench_args"](args, Path("t.csv"), "inf", None, 0)
    assert burst[burst.index("--num-requests") + 1] == "128"
    load = TWO_LEVEL["bench_args"](args, Path("t.csv"), "30.0", 2.5, 1)
    assert load[load.index("--num-requests") + 1] == "200"
    assert load[load.index("--seed") + 1] == "8"  # repeat 1: another arrival pattern
    assert load[load.index("--latency-bound") + 1] == "2.500"


def test_a_combo_names_its_chunk_budgets() -> None:
    run = POLICY_RUNS["Run"].parse("memory_aware+token_aware+chunk32-128")
    assert (run.max_tokens_per_step, run.long_output_tokens_per_step) == (32, 128)
    assert run.name == "memory_aware+token_aware+chunk32-128"
    fixed = POLICY_RUNS["Run"].parse("memory_aware+token_aware+chunk32")
    assert (fixed.max_tokens_per_step, fixed.long_output_tokens_per_step) == (32, None)
    assert POLICY_RUNS["Run"].parse("fcfs+round_robin").chunk_label == ""
    # The one parser of a budget, as chunk_budget.py's --budgets names them too.
    assert POLICY_RUNS["chunk_budgets"]("32-128") == (32, 128)
    assert POLICY_RUNS["chunk_budgets"]("64") == (64, None)
    assert POLICY_RUNS["chunk_budgets"]("off") == (None, None)


def test_a_combo_may_turn_memory_awares_backfill_on() -> None:
    run = POLICY_RUNS["Run"].parse("memory_aware+token_aware+chunk32-128+backfill")
    assert (run.max_tokens_per_step, run.long_output_tokens_per_step, run.backfill) == (
        32, 128, True,
    )  # fmt: skip
    assert run.name == "memory_aware+token_aware+chunk32-128+backfill"
    plain = POLICY_RUNS["Run"].parse("memory_aware+round_robin+backfill")
    assert (plain.max_tokens_per_step, plain.backfill) == (None, True)
    assert not POLICY_RUNS["Run"].parse("memory_aware+token_aware").backfill


@pytest.mark.parametrize(
    ("combo", "message"),
    [
        ("memory_aware+token_aware+chunk32+backfil", "backfil"),  # a typo is not dropped
        ("memory_aware+token_aware+backfill+chunk32", "chunk32"),  # backfill comes last
        ("memory_aware+token_aware+chunk32+chunk64", "chunk64"),
        ("fcfs+round_robin+backfill", "memory_aware"),
        ("sjf+token_aware+chunk32+backfill", "memory_aware"),
        ("memory_aware", "engine\\+router"),
    ],
)
def test_a_combo_with_an_unknown_part_or_backfill_off_memory_aware_is_refused(
    combo: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        POLICY_RUNS["Run"].parse(combo)


def test_a_budget_may_turn_backfill_on_and_nothing_else() -> None:
    # chunk_budget.py's --budgets: `N`, `N-M` or `off`, each optionally `+backfill`.
    parse = POLICY_RUNS["parse_budget"]
    assert parse("32-128+backfill") == (32, 128, True)
    assert parse("off") == (None, None, False)
    for bad in ("off+backfil", "64+backfill+x", "64x"):
        with pytest.raises(ValueError, match="budget"):
            parse(bad)


def test_the_matrix_label_column_fits_its_longest_label() -> None:
    Run = POLICY_RUNS["Run"]
    runs = [
        Run.parse("fcfs+round_robin"),
        Run.parse("memory_aware+power_of_two+chunk512-2048+backfill"),
    ]
    metrics = {"preemptions": 0}  # every other column prints as missing
    cells = {(run.name, load): metrics for run in runs for load in (TWO_LEVEL["BURST"], 0.8)}
    results = TWO_LEVEL["TraceResults"](1.0, 1.0, 2.0, cells)
    lines = TWO_LEVEL["format_matrix"]("conv", results, runs, [0.8]).splitlines()
    long = "power_of_two / memory_aware+chunk512-2048+backfill"
    rows = [line for line in lines if line.startswith(long)]
    assert len(rows) == 2 and all(row[len(long) : len(long) + 2] == "  " for row in rows)
    headers = [line for line in lines if line.startswith("router / engine")]
    assert all(len(h) == len(rows[0]) for h in headers)  # the columns line up
