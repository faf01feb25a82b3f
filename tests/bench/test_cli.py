"""`exegpt bench` end to end against the fake gateway, and its one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from exegpt.bench.workload_plan import (
    TRACE_ATTRIBUTION,
    PlanOptions,
    build_plan,
    clamp_to_context,
    parse_workload,
)
from exegpt.commands.cli import main
from tests.bench import fake_gateway
from tests.bench.fake_gateway import FakeGateway


@pytest.fixture(scope="module")
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway(chunk_delay_s=0.0).start()
    yield server
    server.stop()


def test_task_run_writes_table_and_json(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "bench.json"
    argv = ["bench", "--url", gateway.url + "/", "--workload", "task:G", "--num-requests", "8"]
    argv += ["--rate", "200", "--latency-bound", "30", "--seed", "4", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "exegpt bench: task:G" in table and "8 / 0" in table
    assert "Poisson, 200 req/s" in table and "clamped to context" in table
    document = json.loads(out.read_text())
    settings, metrics = document["settings"], document["metrics"]
    assert settings["url"] == gateway.url
    assert settings["workload"] == "task:G" and settings["arrivals"] == "poisson"
    assert (settings["rate_per_s"], settings["seed"], settings["length_scale"]) == (200.0, 4, 1.0)
    assert settings["model"] == fake_gateway.MODEL
    assert settings["max_model_len"] == fake_gateway.MAX_MODEL_LEN
    assert settings["trace_attribution"] is None
    # Task G draws outputs up to 480 tokens: some do not fit the fake's 256-token context.
    plan = build_plan(parse_workload("task:G"), PlanOptions(num_requests=8, seed=4))
    expected = clamp_to_context(plan, fake_gateway.MAX_MODEL_LEN).num_clamped
    assert settings["num_clamped"] == expected > 0
    assert metrics["num_ok"] == 8 and metrics["fraction_within_bound"] == 1.0
    assert metrics["num_length_mismatch"] == 0
    rows = document["requests"]
    assert all(r["input_tokens"] + r["output_tokens"] <= 256 for r in rows)
    assert all(r["output_tokens"] == r["expected_output_tokens"] for r in rows)


def test_trace_run_records_attribution_and_time_scale(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.0000000,400,10\n"
        "2023-11-16 18:15:46.1000000,30,4\n"
    )
    out = tmp_path / "bench.json"
    argv = ["bench", "--url", gateway.url, "--workload", f"trace:{trace}"]
    argv += ["--trace-time-scale", "0.5", "--length-scale", "0.5", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "trace timestamps x 0.5" in table and f"trace: {TRACE_ATTRIBUTION}" in table
    document = json.loads(out.read_text())
    settings = document["settings"]
    assert settings["arrivals"] == "trace" and settings["trace_time_scale"] == 0.5
    assert settings["rate_per_s"] is None and settings["num_requests"] == 2
    assert settings["trace_attribution"] == TRACE_ATTRIBUTION
    assert "Splitwise" in TRACE_ATTRIBUTION
    # 400 * 0.5 = 200 input tokens + 5 output tokens fit in 256: nothing clamped.
    assert settings["num_clamped"] == 0
    assert [r["arrival_s"] for r in document["requests"]] == pytest.approx([0.0, 0.05])


def test_clamping_is_counted(gateway: FakeGateway, tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,900,20\n")
    out = tmp_path / "bench.json"
    assert (
        main(["bench", "--url", gateway.url, "--workload", f"trace:{trace}", "--json", str(out)])
        == 0
    )
    document = json.loads(out.read_text())
    assert document["settings"]["num_clamped"] == 1
    assert document["requests"][0]["input_tokens"] == 256 - 20


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workload", "task:Q"], "unknown task 'Q'"),
        (["--workload", "nope"], "unknown workload 'nope'"),
        (["--workload", "trace:/no/such.csv"], "trace file not found: /no/such.csv"),
        (["--workload", "task:S", "--rate", "0"], "--rate must be positive"),
        (["--workload", "task:S", "--length-scale", "-1"], "--length-scale must be positive"),
        (["--workload", "task:S", "--num-requests", "0"], "--num-requests must be positive"),
        (["--workload", "task:S", "--latency-bound", "0"], "--latency-bound must be positive"),
        (["--workload", "task:S"], "cannot reach the gateway at http://127.0.0.1:1"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--url", "http://127.0.0.1:1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exegpt bench: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
