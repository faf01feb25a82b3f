"""Metrics: hand-computed percentiles, TPOT, throughput, the within-bound fraction."""

from __future__ import annotations

import pytest

from exegpt.bench.client import RequestRecord
from exegpt.bench.metrics import build_report, duration_s, format_report, summarize, tpot_s


def _record(
    index: int,
    send_s: float,
    ttft_s: float,
    e2e_s: float,
    num_tokens: int,
    error: str | None = None,
) -> RequestRecord:
    """A request whose tokens arrive evenly from its first token to its end."""
    first_s = send_s + ttft_s
    end_s = send_s + e2e_s
    step_s = (end_s - first_s) / (num_tokens - 1) if num_tokens > 1 else 0.0
    return RequestRecord(
        index=index,
        arrival_s=send_s,
        input_tokens=10,
        expected_output_tokens=num_tokens,
        send_s=send_s,
        first_token_s=first_s if num_tokens else None,
        end_s=end_s,
        token_times_s=[first_s + i * step_s for i in range(num_tokens)],
        error=error,
    )


def _five_requests() -> list[RequestRecord]:
    # e2e latencies 1..5 s, all sent at 0; TTFT 0.1 .. 0.5 s; 5 tokens each.
    return [_record(i, 0.0, 0.1 * (i + 1), float(i + 1), 5) for i in range(5)]


def test_percentiles_interpolate_linearly() -> None:
    stats = summarize([5.0, 1.0, 4.0, 2.0, 3.0], (50, 90, 99))
    # Sorted 1..5: position (n - 1) * q = 2, 3.6, 3.96.
    assert stats == pytest.approx({"mean": 3.0, "p50": 3.0, "p90": 4.6, "p99": 4.96, "max": 5.0})
    assert summarize([], (50,)) == {"mean": None, "p50": None, "max": None}


def test_tpot_excludes_the_first_token() -> None:
    record = _record(0, send_s=1.0, ttft_s=0.5, e2e_s=2.5, num_tokens=5)
    assert record.ttft_s == pytest.approx(0.5)
    assert tpot_s(record) == pytest.approx((2.5 - 0.5) / 4)
    assert tpot_s(_record(1, 0.0, 0.5, 0.5, num_tokens=1)) is None


def test_report_latencies_throughput_and_bound() -> None:
    records = [*_five_requests(), _record(5, 0.0, 0.0, 0.5, 0, error="HTTP 503: overloaded")]
    report = build_report(records, latency_bound_s=3.0)
    assert (report["num_requests"], report["num_ok"], report["num_failed"]) == (6, 5, 1)
    assert report["duration_s"] == pytest.approx(5.0)
    assert report["num_output_tokens"] == 25
    assert report["num_input_tokens"] == 50
    assert report["throughput"] == pytest.approx(
        {"sequences_per_s": 1.0, "output_tokens_per_s": 5.0, "total_tokens_per_s": 15.0}
    )
    assert report["e2e_latency_s"]["p50"] == pytest.approx(3.0)
    assert report["e2e_latency_s"]["p90"] == pytest.approx(4.6)
    assert report["e2e_latency_s"]["p99"] == pytest.approx(4.96)
    # TTFT 0.1..0.5: p50 0.3, p99 at position 3.96 -> 0.496.
    assert report["ttft_s"]["p50"] == pytest.approx(0.3)
    assert report["ttft_s"]["p99"] == pytest.approx(0.496)
    # TPOT (e2e - ttft) / 4 = 0.225, 0.45, 0.675, 0.9, 1.125.
    assert report["tpot_s"]["p50"] == pytest.approx(0.675)
    assert report["tpot_s"]["p99"] == pytest.approx(0.9 + 0.96 * 0.225)
    # 1, 2 and 3 s finish within 3 s; the failed request counts as a miss.
    assert report["num_within_bound"] == 3
    assert report["fraction_within_bound"] == pytest.approx(3 / 6)
    assert report["errors"] == {"HTTP 503: overloaded": 1}
    assert report["num_length_mismatch"] == 0


def test_duration_spans_first_send_to_last_end() -> None:
    records = [_record(0, 2.0, 0.1, 1.0, 3), _record(1, 2.5, 0.1, 3.0, 3)]
    assert duration_s(records) == pytest.approx(3.5)
    assert duration_s([]) == 0.0


def test_usage_prompt_tokens_and_length_mismatch() -> None:
    record = _record(0, 0.0, 0.1, 1.0, 4)
    record.usage_prompt_tokens = 12
    record.expected_output_tokens = 6
    report = build_report([record])
    assert report["num_input_tokens"] == 12
    assert report["num_length_mismatch"] == 1
    assert report["fraction_within_bound"] is None


def test_empty_and_all_failed_reports_still_format() -> None:
    empty = build_report([], latency_bound_s=1.0)
    assert empty["num_requests"] == 0 and empty["fraction_within_bound"] is None
    failed = build_report([_record(0, 0.0, 0.0, 0.2, 0, error="boom")], latency_bound_s=1.0)
    assert failed["fraction_within_bound"] == 0.0
    assert failed["e2e_latency_s"]["p50"] is None
    for report in (empty, failed):
        assert "n/a" in format_report(report, "title")


def test_table_shows_the_headline_numbers() -> None:
    table = format_report(build_report(_five_requests(), latency_bound_s=3.0), "exegpt bench")
    assert table.splitlines()[0] == "exegpt bench"
    for expected in ("5 / 0", "1.000 seq/s", "e2e latency p99", "4960.0 ms", "60.0% (3)"):
        assert expected in table
