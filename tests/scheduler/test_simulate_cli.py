"""`exegpt simulate` end to end on a measured profile: one schedule's prediction, the same keys
as `exegpt plan --json`, the profile's serving section priced in, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exegpt.commands.cli import main
from exegpt.profile.format import ServingData, read_profile, write_profile

CONTINUOUS = "continuous:encode_batch_size=8,decode_batch_size=8"
SERVING = ServingData(
    step_s=0.002, token_s=0.0003, request_s=0.001, num_steps=100, busy_fraction=0.8, method="test"
)


@pytest.fixture(scope="module")
def profiles(
    measured_tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The default model measured on a reduced grid, without and with a serving section."""
    data = read_profile(measured_tiny_profile)
    directory = tmp_path_factory.mktemp("simulate")
    bare = write_profile(data, directory / "bare.json")
    served = write_profile(data.model_copy(update={"serving": SERVING}), directory / "served.json")
    return bare, served


def simulate(profile: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "prediction.json"
    out.unlink(missing_ok=True)
    argv = ["simulate", "--profile", str(profile), "--workload", "task:S", "--devices", "1"]
    code = main([*argv, "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if out.exists() else {})


def test_one_schedule_is_predicted_with_the_plan_keys(
    profiles: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = simulate(profiles[0], tmp_path, "--schedule", CONTINUOUS)
    assert code == 0
    predicted = report["predicted"]
    assert predicted["throughput_seq_s"] > 0 and predicted["latency_s"] > 0
    assert report["schedule"]["kind"] == "continuous"
    assert report["schedule"]["decode_batch_size"] == 8
    assert report["device_memory_bytes"] is None  # a CPU profile does not know it
    out = capsys.readouterr().out
    assert f"{predicted['throughput_seq_s']:.3f} seq/s" in out
    assert "forwards only" in out


def test_the_serving_section_slows_the_prediction(
    profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bare = simulate(profiles[0], tmp_path, "--schedule", CONTINUOUS)
    _, served = simulate(profiles[1], tmp_path, "--schedule", CONTINUOUS)
    assert served["serving_overhead"] == {"step_s": 0.002, "token_s": 0.0003, "request_s": 0.001}
    assert served["predicted"]["throughput_seq_s"] < bare["predicted"]["throughput_seq_s"]
    assert served["predicted"]["latency_s"] > bare["predicted"]["latency_s"]


def test_a_plan_file_gives_the_schedule_plan_predicted(
    profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    argv = ["plan", "--profile", str(profiles[1]), "--workload", "task:S", "--gpus", "2"]
    assert main([*argv, "--latency-bound", "inf", "--gpu-memory-gb", "1", "--json", str(plan)]) == 0
    planned = json.loads(plan.read_text())
    out = tmp_path / "simulated.json"
    argv = ["simulate", "--profile", str(profiles[1]), "--workload", "task:S", "--devices", "2"]
    assert main([*argv, "--plan", str(plan), "--gpu-memory-gb", "1", "--json", str(out)]) == 0
    simulated = json.loads(out.read_text())
    assert simulated["schedule"] == planned["schedule"]
    for key in ("throughput_seq_s", "latency_s", "feasible"):
        assert simulated["predicted"][key] == pytest.approx(planned["predicted"][key]), key


def test_a_length_scale_shortens_a_task_as_the_bench_does(
    profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    _, full = simulate(profiles[0], tmp_path, "--schedule", CONTINUOUS)
    _, quarter = simulate(profiles[0], tmp_path, "--schedule", CONTINUOUS, "--length-scale", "0.25")
    assert quarter["output_p99_tokens"] == 16  # ceil(63 x 0.25), as the bench scales it
    assert quarter["mean_output_tokens"] < full["mean_output_tokens"] / 3
    assert quarter["predicted"]["throughput_seq_s"] > full["predicted"]["throughput_seq_s"]


def test_a_trace_of_sent_lengths_keeps_the_latency_length_it_is_given(
    profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    """A burst's lengths as a trace (benchmarks/fidelity.py): every output 10 tokens, the
    latency asked at 20. Continuous batching runs m = 10 - 1 decode steps per sequence, so
    throughput = B / (9 x iteration) and a 20-token request takes 10 iterations more than a
    10-token one: exactly 10 x 8 / (9 x throughput) seconds."""
    from services.scheduler.simulate import PredictRequest, predict

    trace = tmp_path / "sent.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "2026-01-01 00:00:00.0,40,10\n" * 8
    )

    def predicted(length: int | None) -> dict:
        request = PredictRequest(
            str(profiles[0]), f"trace:{trace}", 1, CONTINUOUS, latency_output_tokens=length
        )
        return predict(request)

    own, asked = predicted(None), predicted(20)
    assert own["output_p99_tokens"] == 10 and asked["output_p99_tokens"] == 20
    throughput = own["predicted"]["throughput_seq_s"]
    assert asked["predicted"]["throughput_seq_s"] == pytest.approx(throughput)
    extra_s = asked["predicted"]["latency_s"] - own["predicted"]["latency_s"]
    assert extra_s == pytest.approx(10 * 8 / (9 * throughput))
    with pytest.raises(ValueError, match="latency's output length must be >= 1"):
        predicted(0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--schedule", "fast:encode_batch_size=8"], "unknown kind 'fast'"),
        (["--schedule", "rra:encode_batch_size=8,speed=3"], "'speed=3' is not FIELD=VALUE"),
        (["--schedule", "rra:encode_batch_size=x,decode_batch_size=8"], "must be an integer"),
        (["--schedule", "rra:num_decode_iterations=2"], "give encode_batch_size and decode"),
        (["--schedule", "static:encode_batch_size=0"], "batch sizes must be at least 1"),
        (["--schedule", "waa-c:encode_batch_size=4,decode_batch_size=8"], "WAA needs 1..0"),
        (["--schedule", "static:encode_batch_size=4,tp_degree=2"], "no timings for TP degree 2"),
        (["--schedule", CONTINUOUS, "--length-scale", "-1"], "--length-scale must be positive"),
        (["--plan", "/nonexistent/plan.json"], "is not a regular file"),
    ],
)
def test_bad_input_is_a_one_line_error(
    profiles: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    code, report = simulate(profiles[0], tmp_path, *extra)
    assert code == 2 and report == {}
    err = capsys.readouterr().err
    assert err.startswith("exegpt simulate: error:") and message in err, err


def test_bad_devices_and_profile_are_errors(
    profiles: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--workload", "task:S", "--schedule", CONTINUOUS]
    assert main([*argv, "--profile", str(profiles[0]), "--devices", "0"]) == 2
    assert "--devices must be at least 1" in capsys.readouterr().err
    assert main([*argv, "--profile", str(tmp_path / "none.json"), "--devices", "1"]) == 2
    assert "profile not found" in capsys.readouterr().err
    assert main([*argv, "--profile", str(profiles[0]), "--devices", "1", "--workload", "x"]) == 2
    assert "unknown workload" in capsys.readouterr().err


def test_the_profile_serving_section_is_optional_and_checked(
    profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    from exegpt.profile.layer_profile import ProfileError, load_profile
    from exegpt.serving_overhead import NO_OVERHEAD, ServingOverhead

    assert load_profile(profiles[0]).serving_overhead == NO_OVERHEAD
    assert load_profile(profiles[1]).serving_overhead == ServingOverhead(0.002, 0.0003, 0.001)
    data = json.loads(profiles[1].read_text())
    data["serving"]["token_s"] = -0.001
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="serving.token_s"):
        load_profile(bad)
