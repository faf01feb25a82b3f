"""Profile files: validated on load with a clear reason, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exegpt.models.defaults import default_model_config
from exegpt.profile.format import VERSION, ProfileData, check_writable, write_profile
from exegpt.profile.layer_profile import ProfileError, load_profile


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_a_written_profile_loads_back(t5_profile_path: Path) -> None:
    profile = load_profile(
        t5_profile_path, expected_config_hash=default_model_config().config_hash()
    )
    data = profile.data
    assert data.format == "exegpt-profile" and data.version == VERSION
    assert data.model.name == "exegpt-tiny-t5"
    assert data.software.torch_threads >= 1 and data.software.torch_version
    assert data.hardware.device == "cpu" and data.hardware.device_name
    assert data.grid_name == "tiny"
    # Every measured point keeps its spread around the median.
    row = data.compute[1].encode_attention.rows[0]
    assert all(lo <= hi for lo, hi in zip(row.p10_s, row.p90_s, strict=True))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda text: text[: len(text) // 2], r"not valid JSON \(corrupt or truncated"),
        (lambda text: "", "not valid JSON"),
        (lambda text: "\x00\x01garbage", "not valid JSON"),
        (lambda text: "[1, 2, 3]", "expected a JSON object"),
    ],
)
def test_corrupt_or_truncated_files_are_rejected(
    t5_profile_path: Path, tmp_path: Path, corrupt: Any, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(corrupt(t5_profile_path.read_text()))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_binary_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(path)


def test_missing_file_and_directory_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path)


def test_wrong_version_says_to_profile_again(profile_json: dict[str, Any], tmp_path: Path) -> None:
    profile_json["version"] = 1  # before whole forwards were timed
    with pytest.raises(ProfileError, match="version 1; this build reads version 2"):
        load_profile(write_json(tmp_path / "v1.json", profile_json))


def test_foreign_json_is_not_a_profile(profile_json: dict[str, Any], tmp_path: Path) -> None:
    profile_json["format"] = "something-else"
    with pytest.raises(ProfileError, match="is not an exegpt profile"):
        load_profile(write_json(tmp_path / "foreign.json", profile_json))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("memory"), "memory: Field required"),
        (lambda d: d["compute"]["1"].pop("decode_rest"), "decode_rest"),
        (lambda d: d["embedding"].update(sizes=[4, 1, 32]), "strictly increasing"),
        (lambda d: d["lm_head"].update(median_s=[1.0]), "must all have 3 entries"),
        (lambda d: d["lm_head"].update(median_s=[-1.0, 0.0, 1.0]), "greater than or equal"),
        (lambda d: d.update(tp_degrees=[2]), "include 1"),
        (lambda d: d["compute"].pop("2"), "compute has TP degrees"),
        (lambda d: d.update(extra_field=1), "Extra inputs are not permitted"),
        (lambda d: d["model"].update(config_hash="abc"), "config_hash"),
    ],
)
def test_malformed_fields_are_named(
    profile_json: dict[str, Any], tmp_path: Path, mutate: Any, message: str
) -> None:
    mutate(profile_json)
    with pytest.raises(ProfileError, match=message):
        load_profile(write_json(tmp_path / "bad.json", profile_json))


def test_a_profile_of_another_model_is_rejected(t5_profile_path: Path) -> None:
    with pytest.raises(
        ProfileError, match="was measured for model 'exegpt-tiny-t5' with config hash"
    ):
        load_profile(t5_profile_path, expected_config_hash="0" * 64)


def test_write_is_atomic_and_leaves_no_temporaries(t5_profile: ProfileData, tmp_path: Path) -> None:
    target = write_profile(t5_profile, tmp_path / "out.json")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert load_profile(target).data.profile_id == t5_profile.profile_id


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp / "missing-dir" / "p.json", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "file.txt" / "p.json", "does not exist"),
    ],
)
def test_unwritable_output_paths_are_refused(tmp_path: Path, make_path: Any, message: str) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    with pytest.raises(ProfileError, match=message):
        check_writable(make_path(tmp_path))
