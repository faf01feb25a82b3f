"""`exegpt profile`: bad input gives one clear line and leaves no file; a reduced-grid run
writes a profile that `--validate` checks against whole forwards."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from exegpt.commands import cli
from exegpt.profile.layer_profile import load_profile
from services.profiler.measure import validate
from services.profiler.measure.comm import MeasurementError
from services.profiler.measure.forwards import decode, prefill
from tests.tiny_profile import TINY_GRID

TINY_FLAGS = [
    "--grid=custom",
    "--batch-sizes=1,2",
    "--seq-lens=8,32",
    "--kv-lens=1,16",
    "--num-tokens=1,4,32",
    "--message-bytes=1024,65536",
    "--warmup=1",
    "--repeats=3",
    "--no-progress",
]


def profile_cli(*args: str) -> int:
    return cli.main(["profile", *args])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model=no-such-model"], "unknown model 'no-such-model'"),
        (["--grid=huge"], "unknown grid 'huge'"),
        (["--batch-sizes="], "grid batch_sizes is empty"),
        (["--seq-lens=128,16"], "seq_lens_tokens must be strictly increasing"),
        (["--num-tokens=a,b"], "--num-tokens must be comma-separated integers"),
        (["--grid=custom", "--batch-sizes=1"], "seq_lens_tokens is empty"),
        (["--repeats=0"], "num_repeats >= 1"),
        (["--rounds=0"], "num_rounds >= 1"),
        (["--min-sample-s=-1"], "min_sample_s must be between 0"),
        (["--tp=3"], "tensor-parallel degree 3 does not divide num_heads=4"),
        (["--tp="], "--tp is empty"),
        (["--dtype=int4"], "unsupported dtype 'int4'"),
        (["--threads=0"], "--threads must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "profile.json"
    assert profile_cli(*flags, f"--out={out}") == 2
    err = capsys.readouterr().err
    assert err.startswith("exegpt profile: error: ") and message in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli("--device=cuda", f"--out={tmp_path / 'p.json'}") == 2
    assert "'cuda' was asked for, but this machine has no CUDA" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make_out", "message"),
    [
        (lambda tmp: tmp / "no-dir" / "p.json", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "a-file" / "p.json", "does not exist"),
    ],
)
def test_unwritable_output_fails_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_out: object, message: str
) -> None:
    (tmp_path / "a-file").write_text("")
    assert profile_cli(*TINY_FLAGS, f"--out={make_out(tmp_path)}") == 2  # type: ignore[operator]
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_missing_out_and_misplaced_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli() == 2
    assert "--out FILE is required" in capsys.readouterr().err
    assert profile_cli("--validate=x.json", "--out=y.json") == 2
    assert "--out does not apply with --validate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("failure", "code", "message"),
    [
        (MeasurementError("rank 1 exited with 1"), 1, "measurement failed, nothing written"),
        (KeyboardInterrupt(), 130, "interrupted; nothing written"),
    ],
)
def test_a_run_that_fails_midway_leaves_no_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: BaseException,
    code: int,
    message: str,
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr("services.profiler.measure.run.measure_transfer", fail)
    assert profile_cli(*TINY_FLAGS, "--tp=1", f"--out={tmp_path / 'p.json'}") == code
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_profile_then_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny.json"
    assert profile_cli(*TINY_FLAGS, "--tp=1", "--min-sample-s=0.005", f"--out={out}") == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "TP degrees [1]" in stdout
    profile = load_profile(out)
    assert profile.data.grid_name == "custom"
    assert profile.data.grid["batch_sizes"] == [1, 2]
    assert profile.data.grid["min_sample_s"] == 0.005

    reduced = functools.partial(
        validate.validate_profile,
        points=(prefill(1, 16), prefill(2, 32), decode(2, 8, 12)),
        num_repeats=3,
    )
    monkeypatch.setattr(validate, "validate_profile", reduced)
    report = tmp_path / "report.json"
    assert profile_cli(f"--validate={out}", "--rounds=1", "--no-progress", f"--json={report}") == 0
    stdout = capsys.readouterr().out
    assert "predicted ms" in stdout and "relative error: median" in stdout
    data = json.loads(report.read_text())
    assert [p["kind"] for p in data["points"]] == ["prefill", "prefill", "decode"]
    assert data["worst_abs_error"] >= data["median_abs_error"] >= 0
    assert data["num_rounds"] == 1 and data["repeatability"] is None  # one round: no halves
    shift, around_median, around_worst = data["common_shift"]
    assert -1 < shift and 0 <= around_median <= around_worst
    for point in data["points"]:
        error = point["predicted_s"] / point["measured_s"] - 1
        assert point["relative_error"] == pytest.approx(error)
    # --points names the forwards to time instead.
    named = ("--points=decode:2:8:3,prefill:1:8,decode:2:8:3", f"--json={report}")
    assert profile_cli(f"--validate={out}", "--rounds=1", "--no-progress", *named) == 0
    data = json.loads(report.read_text())
    assert [(p["kind"], p["batch_size"]) for p in data["points"]] == [("decode", 2), ("prefill", 1)]
    capsys.readouterr()
    for bad in ("decode:2:8", "prefill:0:8", "encode:1:8", ",", "prefill:1:100000"):
        assert profile_cli(f"--validate={out}", f"--points={bad}", "--no-progress") == 2
        assert "--points" in capsys.readouterr().err


def test_grid_from_a_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({**TINY_GRID.to_dict(), "batch_sizes": []}))
    assert profile_cli(f"--grid={grid_file}", f"--out={tmp_path / 'p.json'}") == 2
    assert "grid batch_sizes is empty" in capsys.readouterr().err
    grid_file.write_text("{not json")
    assert profile_cli(f"--grid={grid_file}", f"--out={tmp_path / 'p.json'}") == 2
    assert "is not readable JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("contents", "message"),
    [("{", "not valid JSON"), ('{"format": "exegpt-profile", "version": 9}', "version 9")],
)
def test_validate_rejects_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], contents: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(contents)
    assert profile_cli(f"--validate={path}") == 2
    assert message in capsys.readouterr().err


def test_validate_refuses_a_profile_of_another_model(
    t5_profile_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert profile_cli(f"--validate={t5_profile_path}", f"--model={llama_dir}") == 2
    assert "profile this model instead" in capsys.readouterr().err
