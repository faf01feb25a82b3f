"""The scheduler on a profile the profiler really measured (not the analytic roofline).

`exegpt profile` writes the file, `exegpt plan` reads it through `load_profile`: this is
the contract between the two services, exercised end to end on this machine's CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from exegpt.commands.cli import main
from exegpt.dtypes import detect_and_choose
from exegpt.models.prepack import linear_kernel
from exegpt.profile.format import write_profile
from exegpt.profile.layer_profile import load_profile
from services.profiler.measure.run import run_profile
from tests.tiny_profile import tiny_request


@pytest.fixture(scope="module")
def measured_profile(measured_tiny_profile: Path) -> Path:
    """The default model, measured at TP 1 on a reduced grid (tests/conftest.py)."""
    return measured_tiny_profile


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
    # A bound halfway between the fastest kind's best and the unbounded choice binds, planned
    # against as given (no headroom: 0.9 x a bound that close to the fastest could be below
    # everything, and then both searches only minimise latency, among ties in any order).
    best_by_kind = unbounded["best_by_kind"]
    fastest = min(best_by_kind[kind]["latency_s"] for kind in ("rra", "waa-c", "waa-m"))
    bound = (fastest + unbounded["predicted"]["latency_s"]) / 2
    bounded = ("--latency-bound", f"{bound:.6f}", "--latency-headroom", "0")
    code, searched = _plan(measured_profile, tmp_path, *bounded)
    assert code == 0 and searched["meets_bound"] is True
    assert searched["predicted"]["latency_s"] <= bound
    code, exhaustive = _plan(measured_profile, tmp_path, *bounded, "--exhaustive")
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


@pytest.fixture(scope="module")
def bf16_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model measured in bfloat16 (the profile records it)."""
    data = run_profile(tiny_request(tp_degrees=(1,), dtype="bfloat16"))
    return write_profile(data, tmp_path_factory.mktemp("measured") / "tiny-bf16.json")


def test_the_profile_records_its_dtype_and_the_kv_bytes_follow(
    measured_profile: Path, bf16_profile: Path
) -> None:
    float32 = load_profile(measured_profile)
    bfloat16 = load_profile(bf16_profile)
    assert (float32.data.model.dtype, float32.data.model.dtype_bytes) == ("float32", 4)
    assert (bfloat16.data.model.dtype, bfloat16.data.model.dtype_bytes) == ("bfloat16", 2)
    assert bfloat16.kv_bytes_per_token(1) * 2 == float32.kv_bytes_per_token(1)
    # Weights are counted before the profiler packs its Linears as serving does.
    memory16, memory32 = bfloat16.data.memory, float32.data.memory
    assert memory16.embedding_weight_bytes * 2 == memory32.embedding_weight_bytes
    assert {tp: n * 2 for tp, n in memory16.decode_layer_weight_bytes.items()} == (
        memory32.decode_layer_weight_bytes
    )
    assert float32.data.model.linear_kernel == "aten"
    assert bfloat16.data.model.linear_kernel == linear_kernel(torch.bfloat16, "cpu")


def test_a_profile_from_before_the_dtype_field_means_float32(
    measured_profile: Path, tmp_path: Path
) -> None:
    raw = json.loads(measured_profile.read_text())
    del raw["model"]["dtype"], raw["model"]["dtype_bytes"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    assert load_profile(old).data.model.dtype == "float32"
    code, _ = _plan(old, tmp_path, "--latency-bound", "inf", "--dtype", "float32")
    assert code == 0


def test_the_planner_refuses_a_profile_of_another_dtype(
    measured_profile: Path, bf16_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _plan(bf16_profile, tmp_path, "--latency-bound", "inf")  # its own dtype
    assert code == 0 and report["meets_bound"] is True
    code, report = _plan(bf16_profile, tmp_path, "--latency-bound", "inf", "--dtype", "bfloat16")
    assert code == 0
    capsys.readouterr()
    (tmp_path / "plan.json").unlink()
    code, report = _plan(bf16_profile, tmp_path, "--latency-bound", "inf", "--dtype", "float32")
    err = capsys.readouterr().err
    assert code == 2 and report == {} and err.count("\n") == 1
    assert "was measured in bfloat16, but the workers run float32" in err
    assert "exegpt profile --dtype float32" in err
    code, _ = _plan(measured_profile, tmp_path, "--latency-bound", "inf", "--dtype", "float16")
    assert code == 2 and "was measured in float32" in capsys.readouterr().err
    code, _ = _plan(measured_profile, tmp_path, "--latency-bound", "inf", "--dtype", "int8")
    assert code == 2 and "unsupported dtype 'int8'" in capsys.readouterr().err


def test_auto_plans_for_what_workers_here_would_run(
    measured_profile: Path, bf16_profile: Path, tmp_path: Path
) -> None:
    here = detect_and_choose("auto", "cpu").name
    for path, dtype in ((measured_profile, "float32"), (bf16_profile, "bfloat16")):
        code, _ = _plan(path, tmp_path, "--latency-bound", "inf", "--dtype", "auto")
        assert code == (0 if dtype == here else 2)


def test_an_analytic_model_has_no_measured_dtype_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _plan(Path("analytic:a100-80gb"), tmp_path, "--latency-bound", "inf")
    assert code == 0
    code, _ = _plan(
        Path("analytic:a100-80gb"), tmp_path, "--latency-bound", "inf", "--dtype", "bfloat16"
    )
    assert code == 2 and "--dtype applies to a measured profile" in capsys.readouterr().err


def test_plan_starts_from_the_calibration_beside_the_profile(
    measured_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.scheduler.calibration import Calibration
    from services.scheduler.calibration_store import save_calibration
    from services.scheduler.observations import StageKind

    profile = tmp_path / "tiny.json"
    profile.write_bytes(measured_profile.read_bytes())
    code, plain = _plan(profile, tmp_path, "--latency-bound", "inf", "--kinds", "rra")
    assert code == 0 and plain["calibration"] is None
    assert "calibrated" not in capsys.readouterr().out
    slower = Calibration(
        {StageKind.ENCODE: 1.0, StageKind.DECODE: 3.0}, {StageKind.ENCODE: 8, StageKind.DECODE: 22}
    )
    assert save_calibration(tmp_path / "tiny.calibration.json", slower)
    code, calibrated = _plan(profile, tmp_path, "--latency-bound", "inf", "--kinds", "rra")
    assert code == 0
    assert "calibrated from 30 observations" in capsys.readouterr().out
    assert calibrated["calibration"]["factors"] == {"encode": 1.0, "decode": 3.0}
    slow_s = calibrated["best_by_kind"]["rra"]["throughput_seq_s"]
    assert slow_s < plain["best_by_kind"]["rra"]["throughput_seq_s"]
