"""`exegpt plan` in-process: output, JSON, plots, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exegpt.commands.cli import main

PROFILE = "analytic:cpu"  # the default tiny T5 on a CPU worker
BASE = ["plan", "--profile", PROFILE, "--workload", "task:S", "--gpus", "2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plan_prints_and_writes_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "plan.json"
    frontier = tmp_path / "frontier.png"
    gantt = tmp_path / "timeline.png"
    code = main(
        [
            *BASE,
            "--latency-bound",
            "2.0",
            "--json",
            str(report_path),
            "--plot-frontier",
            str(frontier),
            "--plot-timeline",
            str(gantt),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "static" in out and "continuous" in out and "evaluations" in out
    report = json.loads(report_path.read_text())
    assert report["meets_bound"] is True
    # The honest answer is the best predicted schedule, whatever its kind (baselines included).
    feasible = {k: v for k, v in report["best_by_kind"].items() if v["feasible"]}
    best = max(feasible, key=lambda k: feasible[k]["throughput_seq_s"])
    assert report["schedule"]["kind"] == best
    control = {"encode_batch_size", "decode_batch_size", "num_decode_iterations"}
    control |= {"num_micro_batches", "tp_degree", "num_tp_devices", "num_encode_devices"}
    assert control <= set(report["schedule"])
    assert report["predicted"]["describe"] in out
    assert 0 < report["predicted"]["latency_s"] <= 2.0
    assert report["predicted"]["throughput_seq_s"] > 0
    assert report["search"]["num_evaluations"] > 0 and report["search"]["wall_s"] > 0
    assert {"static", "continuous"} <= set(report["best_by_kind"])
    for path in (frontier, gantt):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_unmeetable_bound_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "plan.json"
    code = main([*BASE, "--latency-bound", "0.0001", "--kinds", "rra", "--json", str(report_path)])
    assert code == 0
    assert "no configuration meets the latency bound" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["meets_bound"] is False and report["schedule"] is None
    assert report["lowest_latency"]["latency_s"] > 0.0001


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--workload", "task:X"], "unknown task"),
        (["--workload", "bogus"], "unknown workload"),
        (["--latency-bound", "0"], "must be positive"),
        (["--latency-bound", "-3"], "must be positive"),
        (["--latency-bound", "soon"], "number of seconds"),
        (["--gpus", "0"], "at least 1"),
        (["--tp-degrees", "8", "--gpus", "8"], "no timings for TP degree 8"),
        (["--tp-degrees", "4"], "contradictory options: TP degree 4 needs 4 devices"),
        (["--tp-degrees", "2,x"], "comma-separated integers"),
        (["--kinds", "static"], "baseline"),
        (["--kinds", "rra,fast"], "unknown schedule kind"),
        (["--profile", "analytic:cpu:opt-13b", "--model-config", "x.json"], "either"),
        (["--profile", "/no/such/profile.json"], "profile not found"),
        (["--profile", "/no/such/profile.json", "--model-config", "x.json"], "analytic"),
        (["--profile", "analytic:tpu"], "unknown analytic device"),
        (["--gpu-memory-gb", "0"], "must be positive"),
        (["--gpus", "1", "--kinds", "waa-c,waa-m"], "WAA needs at least 2 devices"),
        (["--throughput-tolerance", "-0.1"], "non-negative"),
        (["--length-scale", "0.5"], "applies to trace workloads"),
        (["--workload", "trace:/no/such/trace.csv"], "trace file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*BASE, "--latency-bound", "2.0"]
    for option, value in zip(arguments[::2], arguments[1::2], strict=True):
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("exegpt plan: error:")
    assert message in err


def test_missing_required_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--profile", PROFILE, "--workload", "task:S", "--gpus", "2"]) == 2
    assert "--latency-bound is required" in capsys.readouterr().err


def test_nothing_fits_in_memory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "plan.json"
    argv = [*BASE, "--latency-bound", "2.0", "--gpu-memory-gb", "0.001", "--json", str(report_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no configuration fits in memory" in out and "0.001 GiB available" in out
    report = json.loads(report_path.read_text())
    assert report["meets_bound"] is False and report["lowest_latency"] is None
    assert "fits in memory" in report["infeasible_reason"]


def test_one_device_searches_rra_and_says_why_waa_is_absent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", "--profile", PROFILE, "--workload", "task:S", "--gpus", "1"]
    assert main([*argv, "--latency-bound", "inf"]) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "(needs at least 2 devices)" in out
    assert "rra B_E=" in out  # RRA was searched on the one device
