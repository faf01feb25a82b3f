"""`exegpt bench` against the real gateway (router + worker) that tests/conftest.py starts
(the shared `gateway_url` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

from exegpt.bench import against_plan
from exegpt.bench.workload_plan import PlanOptions, build_plan, parse_workload
from exegpt.commands.cli import main

NUM_REQUESTS = 6
SEED = 11


def test_bench_task_s_against_the_gateway(gateway_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--url", gateway_url, "--workload", "task:S"]
    argv += ["--num-requests", str(NUM_REQUESTS), "--length-scale", "0.1", "--seed", str(SEED)]
    argv += ["--latency-bound", "120", "--timeout-s", "120", "--json", str(out)]
    assert main(argv) == 0
    document = json.loads(out.read_text())
    metrics, settings, rows = document["metrics"], document["settings"], document["requests"]
    assert (metrics["num_requests"], metrics["num_ok"], metrics["num_failed"]) == (
        NUM_REQUESTS,
        NUM_REQUESTS,
        0,
    )
    assert metrics["errors"] == {}
    assert settings["num_clamped"] == 0
    plan = build_plan(
        parse_workload("task:S"),
        PlanOptions(num_requests=NUM_REQUESTS, length_scale=0.1, seed=SEED),
    )
    # Output lengths are forced (ignore_eos): each request streams exactly its planned length.
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (p.input_tokens, p.output_tokens) for p in plan
    ]
    assert all(r["usage_completion_tokens"] == r["output_tokens"] for r in rows)
    # The engine's queue seconds: admitted after sending, before the first token arrived.
    assert all(0 < r["queue_s"] < r["ttft_s"] for r in rows)
    # And admission to last token, within the client's end to end after the queue.
    assert all(0 < r["generation_s"] <= r["e2e_s"] - r["queue_s"] for r in rows)
    assert all(r["finish_reason"] == "length" for r in rows)
    assert metrics["num_output_tokens"] == sum(p.output_tokens for p in plan)
    assert metrics["num_input_tokens"] == sum(p.input_tokens for p in plan)
    assert metrics["num_length_mismatch"] == 0
    assert metrics["fraction_within_bound"] == 1.0
    assert metrics["throughput"]["sequences_per_s"] > 0


def test_the_library_runs_bench_as_its_own_module(gateway_url: str, tmp_path: Path) -> None:
    """against_plan.run_bench (the demo's, the benchmarks' and the calibration pass's burst)
    runs `python -m exegpt.bench` in a child process, not the `exegpt` command line."""
    out = tmp_path / "burst.json"
    document = against_plan.run_bench(gateway_url, "task:S", 4, out, 0.1, seed=SEED)
    assert document == json.loads(out.read_text())
    metrics = document["metrics"]
    assert (metrics["num_requests"], metrics["num_ok"], metrics["num_failed"]) == (4, 4, 0)
    settings = document["settings"]
    assert (settings["url"], settings["seed"], settings["length_scale"]) == (gateway_url, SEED, 0.1)
