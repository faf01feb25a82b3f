"""The scheduler on a profile the profiler really measured (not the analytic roofline).

`exegpt profile` writes the file, `exegpt plan` reads it through `load_profile`: this is
the contract between the two services, exercised end to end on this machine's CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exegpt.cli import main
from services.profiler.profile_format import write_profile
from services.profiler.profiling import run_profile
from tests.profiler.conftest import tiny_request


@pytest.fixture(scope="module")
def measured_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, measured at TP 1 on a reduced grid (about a second)."""
    data = run_profile(tiny_request(tp_degrees=(1,)))
    return write_profile(data, tmp_path_factory.mktemp("measured") / "tiny.json")


def _plan(profile: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    report = tmp_path / "plan.json"
    argv = ["plan", "--profile", str(profile), "--workload", "task:S", "--gpus", "2"]
    code = main([*argv, "--gpu-memory-gb", "1", "--json", str(report), *extra])
    return code, (json.loads(report.read_text()) if report.exists() else {})


def test_plan_on_a_measured_profile_matches_exhaustive(
    measured_profile: Path, tmp_path: Path
) -> None:
    code, unbounded = _plan(measured_profile, tmp_path, "--latency-bound", "inf")
    assert code == 0 and unbounded["meets_bound"] is True
    # A bound halfway between the fastest kind's best and the unbounded choice binds.
    best_by_kind = unbounded["best_by_kind"]
    fastest = min(best_by_kind[kind]["latency_s"] for kind in ("rra", "waa-c", "waa-m"))
    bound = (fastest + unbounded["predicted"]["latency_s"]) / 2
    code, searched = _plan(measured_profile, tmp_path, "--latency-bound", f"{bound:.6f}")
    assert code == 0 and searched["meets_bound"] is True
    assert searched["predicted"]["latency_s"] <= bound
    code, exhaustive = _plan(
        measured_profile, tmp_path, "--latency-bound", f"{bound:.6f}", "--exhaustive"
    )
    assert code == 0
    best = exhaustive["predicted"]["throughput_seq_s"]
    assert searched["predicted"]["throughput_seq_s"] >= best * (1 - 0.01)
    assert searched["search"]["num_evaluations"] < exhaustive["search"]["num_evaluations"]


def test_a_tp_degree_the_profile_lacks_is_a_clear_error(
    measured_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _plan(measured_profile, tmp_path, "--latency-bound", "inf", "--tp-degrees", "2")
    assert code == 2 and report == {}
    assert "TP degree" in capsys.readouterr().err
