"""Per-request records -> the benchmark report (a JSON-ready dict) and its printed table.

Pure: no I/O, no clocks. Percentiles are numpy's default (linear interpolation between
order statistics). Latency statistics cover successful requests; the within-bound fraction
is over all requests, so a failed request counts as one that missed the bound.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from exegpt.bench.client import RequestRecord

NUM_ERRORS_REPORTED = 10


def summarize(values: Sequence[float], points: Sequence[int]) -> dict[str, float | None]:
    """Mean and the given percentiles (as `p50`, ...); None for each when there are no values."""
    keys = ["mean", *(f"p{point}" for point in points), "max"]
    if not values:
        return dict.fromkeys(keys)
    array = np.asarray(values, dtype=np.float64)
    stats = [array.mean(), *np.percentile(array, points), array.max()]
    return {key: float(value) for key, value in zip(keys, stats, strict=True)}


class Latency(Protocol):
    """What the latency figures read of a request (a RequestRecord, or a RowLatency)."""

    @property
    def e2e_s(self) -> float: ...
    @property
    def ttft_s(self) -> float | None: ...
    @property
    def num_output_tokens(self) -> int: ...


@dataclass(frozen=True)
class RowLatency:
    """A completed request of a bench JSON document's "requests" rows."""

    e2e_s: float
    ttft_s: float | None
    num_output_tokens: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> RowLatency:
        return cls(row["e2e_s"], row["ttft_s"], row["output_tokens"])


def tpot_s(record: Latency) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (n_out - 1)."""
    ttft_s = record.ttft_s
    if ttft_s is None or record.num_output_tokens < 2:
        return None
    return (record.e2e_s - ttft_s) / (record.num_output_tokens - 1)


def duration_s(records: Sequence[RequestRecord]) -> float:
    """From the first request sent to the last one finished (failed ones included)."""
    if not records:
        return 0.0
    return max(r.end_s for r in records) - min(r.send_s for r in records)


def build_report(
    records: Sequence[RequestRecord], latency_bound_s: float | None = None
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    elapsed_s = duration_s(records)
    num_output_tokens = sum(r.num_output_tokens for r in ok)
    num_input_tokens = sum(
        r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.input_tokens for r in ok
    )
    errors = Counter(r.error for r in records if r.error)
    report: dict[str, Any] = {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_failed": len(records) - len(ok),
        "duration_s": elapsed_s,
        "num_input_tokens": num_input_tokens,
        "num_output_tokens": num_output_tokens,
        "throughput": {
            "sequences_per_s": _rate(len(ok), elapsed_s),
            "output_tokens_per_s": _rate(num_output_tokens, elapsed_s),
            "total_tokens_per_s": _rate(num_input_tokens + num_output_tokens, elapsed_s),
        },
        **latency_figures(ok, len(records), latency_bound_s),
        # How late the client sent requests against the plan (a saturated client, or the
        # --max-concurrency cap, shows here).
        "send_lag_s": summarize([r.send_s - r.arrival_s for r in records], (50, 99)),
        # Requests whose streamed token count differs from the forced output length.
        "num_length_mismatch": sum(r.num_output_tokens != r.expected_output_tokens for r in ok),
        "latency_bound_s": latency_bound_s,
        "errors": dict(errors.most_common(NUM_ERRORS_REPORTED)),
    }
    return report


def latency_figures(
    ok: Sequence[Latency], num_requests: int, latency_bound_s: float | None
) -> dict[str, Any]:
    """The latency part of a report: e2e, TTFT and TPOT over the successful requests `ok`,
    and with a bound, those within it (the fraction over all `num_requests`)."""
    figures: dict[str, Any] = {
        "e2e_latency_s": summarize([r.e2e_s for r in ok], (50, 90, 99)),
        "ttft_s": summarize([r.ttft_s for r in ok if r.ttft_s is not None], (50, 99)),
        "tpot_s": summarize([t for t in (tpot_s(r) for r in ok) if t is not None], (50, 99)),
        "num_within_bound": None,
        "fraction_within_bound": None,
    }
    if latency_bound_s is not None:
        within = sum(r.e2e_s <= latency_bound_s for r in ok)
        figures["num_within_bound"] = within
        figures["fraction_within_bound"] = within / num_requests if num_requests else None
    return figures


def _rate(count: float, elapsed_s: float) -> float:
    return count / elapsed_s if elapsed_s > 0 else 0.0


def format_report(
    report: dict[str, Any],
    title: str,
    settings_rows: Sequence[tuple[str, str]] = (),
    footer: Sequence[str] = (),
) -> str:
    """A readable table of the report for the terminal: the settings rows first, then metrics."""
    throughput = report["throughput"]
    rows: list[tuple[str, str]] = [
        *settings_rows,
        ("requests (ok / failed)", f"{report['num_ok']} / {report['num_failed']}"),
        ("duration", f"{report['duration_s']:.2f} s"),
        ("throughput", f"{throughput['sequences_per_s']:.3f} seq/s"),
        ("output tokens/s", f"{throughput['output_tokens_per_s']:.1f}"),
        ("total tokens/s", f"{throughput['total_tokens_per_s']:.1f}"),
        ("tokens (in / out)", f"{report['num_input_tokens']} / {report['num_output_tokens']}"),
    ]
    rows += _stat_rows("e2e latency", report["e2e_latency_s"], (50, 90, 99))
    rows += _stat_rows("TTFT", report["ttft_s"], (50, 99))
    rows += _stat_rows("TPOT", report["tpot_s"], (50, 99))
    if report["latency_bound_s"] is not None and report["fraction_within_bound"] is not None:
        rows.append(
            (
                f"within {report['latency_bound_s']:g} s bound",
                f"{report['fraction_within_bound']:.1%} ({report['num_within_bound']})",
            )
        )
    if report["num_length_mismatch"]:
        rows.append(("wrong output length", str(report["num_length_mismatch"])))
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * max(len(title), width + 16)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    for message, count in report["errors"].items():
        lines.append(f"error x{count}: {message}")
    lines += footer
    return "\n".join(lines)


def _stat_rows(
    name: str, stats: dict[str, float | None], points: Sequence[int]
) -> list[tuple[str, str]]:
    return [(f"{name} p{point}", _ms(stats[f"p{point}"])) for point in points]


def _ms(value_s: float | None) -> str:
    return "n/a" if value_s is None else f"{value_s * 1000:.1f} ms"
