"""Reading a saturating burst as the simulator predicts: steady-state rate, life in the batch."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from exegpt.bench import against_plan, cli
from exegpt.bench.workload_plan import build_plan


def _row(
    send_s: float,
    ttft_s: float,
    e2e_s: float,
    tokens: int,
    queue_s: float = 0.0,
    backlog_s: float = 0.0,
    reported: bool = True,
) -> dict:
    """A bench row; the engine reports the seconds from admission to last token, which
    leave out its queue and the backlog before it received the request."""
    generation_s = e2e_s - queue_s - backlog_s if reported else None
    return {"send_s": send_s, "ttft_s": ttft_s, "e2e_s": e2e_s, "output_tokens": tokens,
            "queue_s": queue_s, "generation_s": generation_s, "error": None}  # fmt: skip


def _document(rows: list[dict], num_failed: int = 0) -> dict:
    return {"requests": rows, "metrics": {"num_failed": num_failed,
            "throughput": {"sequences_per_s": 1.0}}}  # fmt: skip


def test_steady_rate_ignores_the_fill_and_the_drain() -> None:
    # 5 requests complete in a slow start, then 90 at 10 per second, then a slow tail.
    ends = [1.0 + i for i in range(5)] + [20.0 + i / 10 for i in range(90)]
    ends += [40.0 + i for i in range(5)]
    assert against_plan.steady_throughput(ends) == pytest.approx(10.0, rel=0.15)


def test_a_continuous_burst_leaves_its_fill_out() -> None:
    # 16 requests enter at once at t = 0, then one every 0.1 s as one finishes (each takes
    # 1.6 s once admitted): 10 per second, the first batch's admissions left out.
    rows = [_row(0.0, 0.1, 1.6, 5) for _ in range(16)]
    rows += [_row(0.0, 0.1, 1.6 + 1.6 + 0.1 * i, 5, queue_s=1.6 + 0.1 * i) for i in range(100)]
    # The window opens on the last 5 of the first batch's 16 (all at 1.6 s, a bunch the
    # steady stream does not have): the slope reads 9.4 per second.
    assert against_plan.measure(_document(rows), 5).throughput_seq_s == pytest.approx(
        10.0, rel=0.07
    )


def test_steady_rate_ends_when_the_last_request_is_admitted() -> None:
    # 60 requests complete at 10 per second while a queue waits (each served 1 s after its
    # admission); the last 40 were admitted by 6.9 s and drain in 0.4 s (100 per second).
    steady = [_row(0.0, 0.5, 1.0 + 0.1 * i, 10, queue_s=0.1 * i) for i in range(60)]
    drain = [_row(0.0, 0.5, 7.0 + 0.01 * j, 10, queue_s=6.0 + 0.0225 * j) for j in range(40)]
    rows = steady + drain
    assert against_plan.last_admission_s(rows) == pytest.approx(6.0 + 0.0225 * 39)
    # The 10th..90th percentile completions alone run into the drain: 51 completions at 10
    # per second (1.9..6.9 s), then 30 at 100 per second (7.0..7.29 s). Their least-squares
    # slope reads 12.75 per second, faster than steady (counting between the window's ends
    # would read 80 / 5.39 = 14.8).
    ends = [r["send_s"] + r["e2e_s"] for r in rows]
    assert against_plan.steady_window(ends) == pytest.approx((1.9, 7.29))
    drained = against_plan.steady_throughput(ends)
    assert drained == pytest.approx(12.75, abs=0.01)
    # Cut where the queue emptied: completions 9..59, (59 - 9) / (6.9 - 1.9) = 10 per second.
    measured = against_plan.measure(_document(rows), p99_output_tokens=10)
    assert measured.throughput_seq_s == pytest.approx(10.0)
    assert against_plan.steady_window(ends, 6.9) == pytest.approx((1.9, 6.9))
    # A queue that empties before the window's start leaves the quantiles alone.
    assert against_plan.steady_throughput(ends, 0.5) == pytest.approx(drained)


def test_a_schedule_that_finishes_in_bunches_reads_its_cycle_rate() -> None:
    # RRA at saturation: after a fill of 111 completions, each 2 s cycle ends with its 100
    # requests finishing within 0.2 s, 50 per second. The window (10th..90th percentile)
    # opens at one bunch's start and closes near another's end: counting between its ends
    # reads 54.9 per second (a bunch more than its cycles deliver), the slope 49.9.
    ends = [0.5 + 0.01 * i for i in range(111)]
    ends += [2.0 * (c + 1) + 0.002 * k for c in range(10) for k in range(100)]
    rows = [_row(0.0, 0.1, end, 5, queue_s=end - 1.0) for end in ends]
    assert against_plan.steady_window(ends) == pytest.approx((2.0, 18.176))
    measured = against_plan.measure(_document(rows), 5)
    assert measured.throughput_seq_s == pytest.approx(50.0, rel=0.03)


@pytest.mark.parametrize("phase_s", [0.0, 0.3, 0.7, 1.1, 1.5, 1.9])
@pytest.mark.parametrize(("cycles", "highest"), [(4, 100.0), (5, 102.0)])
def test_few_cycles_read_a_few_percent_off_mostly_low(
    phase_s: float, cycles: int, highest: float
) -> None:
    # Static batching, 4 batches a replica (the measured-burst rule), 2 replicas: each
    # replica finishes its 100 requests every 2 s within 0.2 s, 100 per second in all, the
    # second replica `phase_s` behind. With ~3 cycles in the window the slope reads a few
    # percent low, whatever the phase; with 5, a late phase reads up to ~1.4% high.
    ends = sorted(
        offset + 2.0 * (c + 1) + 0.002 * k
        for offset in (0.0, phase_s)
        for c in range(cycles)
        for k in range(100)
    )
    rate = against_plan.steady_throughput(ends)
    assert rate is not None and 88.0 < rate < highest


def test_p99_length_latency_leaves_the_queueing_out() -> None:
    # Every request is served in 2 s once admitted; later ones waited longer in the queue.
    rows = [_row(0.0, 5.0 * i + 0.3, 5.0 * i + 2.0, 10, queue_s=5.0 * i) for i in range(40)]
    measured = against_plan.measure(_document(rows), p99_output_tokens=10)
    assert measured.p99_length_latency_s == pytest.approx(2.0)
    assert measured.num_ok == 40


def test_a_static_batchs_prefill_is_counted() -> None:
    # Static batches of 8: the whole batch's prefill (3 s) precedes each first token, then
    # 0.1 s per token. A request's latency is its batch's prefill plus its decode steps.
    rows = [
        _row(0.0, 4.0 * (i // 8) + 3.0, 4.0 * (i // 8) + 3.0 + 0.1 * 9, 10, queue_s=4.0 * (i // 8))
        for i in range(64)
    ]
    measured = against_plan.measure(_document(rows), p99_output_tokens=10)
    assert measured.p99_length_latency_s == pytest.approx(3.9)


def test_only_the_p99_length_requests_count() -> None:
    # Short requests served in 1 s, three long ones (at the p99 length) among them in 5 s.
    rows = [_row(i, 0.1, 5.0 if i in (30, 50, 70) else 1.0, 90 if i in (30, 50, 70) else 10)
            for i in range(100)]  # fmt: skip
    assert against_plan.measure(_document(rows), 90).p99_length_latency_s == pytest.approx(5.0)


def test_the_drains_fast_tail_does_not_stand_in_for_the_steady_state() -> None:
    # At steady state a request of S tokens takes 0.1 + 0.05 x S s (lengths 5..15); only three
    # drain requests, running beside an emptying batch in 0.3 s, reach the p99 length of 16.
    # The window's line reads 0.1 + 0.05 x 16 = 0.9 s there.
    rows = [_row(0.0, 0.1, float(i + 1), 5 + i % 11) for i in range(90)]
    for row in rows:
        row["generation_s"] = 0.1 + 0.05 * row["output_tokens"]
    drain = [_row(0.0, 0.1, 100.0 + i, 16 if i < 3 else 5) for i in range(10)]
    for row in drain:
        row["generation_s"] = 0.3
    measured = against_plan.measure(_document(rows + drain), p99_output_tokens=16)
    assert measured.p99_length_latency_s == pytest.approx(0.9)


def test_a_bursts_backlog_before_the_engine_is_left_out() -> None:
    # Every request is served in 2 s once admitted, after waiting up to 3 s in the client's,
    # the gateway's and the router's backlog before the engine received it.
    rows = [_row(0.0, 0.5, 2.0 + 0.1 * i, 10, backlog_s=0.1 * i) for i in range(30)]
    measured = against_plan.measure(_document(rows), p99_output_tokens=10)
    assert measured.p99_length_latency_s == pytest.approx(2.0)


def test_without_the_engines_generation_seconds_there_is_no_latency() -> None:
    rows = [_row(0.0, 0.1, 1.0, 10, reported=False) for _ in range(20)]
    assert math.isnan(against_plan.measure(_document(rows), 10).p99_length_latency_s)


def test_comparison_reports_errors_and_the_bound() -> None:
    measured = against_plan.Measured(8.0, 3.0, 10, 0, 7.0)
    result = against_plan.compare({"throughput_seq_s": 10.0, "latency_s": 2.0}, measured, 2.5)
    assert result.throughput_error == pytest.approx(-0.2)
    assert result.latency_error == pytest.approx(0.5)
    assert result.meets_bound is False
    assert against_plan.compare({"throughput_seq_s": 1, "latency_s": 1}, measured, math.inf)\
        .meets_bound is None  # fmt: skip


def test_failed_burst_has_no_latency() -> None:
    failed = dict(_row(0.0, 0.0, 0.0, 0), error="HTTP 503")
    measured = against_plan.measure(_document([failed], num_failed=1), 10)
    assert measured.num_ok == 0 and math.isnan(measured.p99_length_latency_s)


def _planned_lengths(seed: int) -> list[tuple[int, int]]:
    """The lengths `exegpt bench` would send for the command run_bench builds with `seed`."""
    command = against_plan.bench_command(
        "http://127.0.0.1:1", "task:S", 16, Path("out.json"), 0.25, seed
    )
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert command[1:3] == ["-m", "exegpt.bench"]  # the library's own entry point
    settings = cli.settings_from_args(parser.parse_args(command[3:]))
    planned = build_plan(settings.workload, settings.plan)
    return [(r.input_tokens, r.output_tokens) for r in planned]


def test_the_bench_command_draws_its_lengths_with_the_given_seed() -> None:
    assert len(_planned_lengths(0)) == 16
    assert _planned_lengths(3) == _planned_lengths(3)
    assert _planned_lengths(3) != _planned_lengths(0)
