"""`--model org/name` from a local Hugging Face cache layout (HF_HUB_CACHE / HF_HOME), offline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from exegpt.models.loader import ModelNotFoundError, load_model, read_model_card, save_default_model
from tests.models.helpers import greedy, make_runner

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_layout(hub: Path, repo_id: str, checkpoint: Path, revision: str = REVISION) -> Path:
    """What huggingface_hub writes: blobs by hash, a snapshot of links to them, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_default_model(tmp_path_factory.mktemp("plain") / "tiny")


def test_an_org_name_loads_from_hf_hub_cache(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _cache_layout(tmp_path / "hub", "acme/tiny-t5", checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("acme/tiny-t5")
    assert loaded.name == "acme/tiny-t5"
    reference = load_model(str(checkpoint))
    for ours, theirs in zip(loaded.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    prompts = [[5, 6, 7], [40, 41]]
    assert greedy(make_runner(loaded), prompts, 4) == greedy(make_runner(reference), prompts, 4)
    card = read_model_card("acme/tiny-t5")
    assert card.name == "acme/tiny-t5" and Path(card.source) == snapshot.resolve()
    assert load_model(f"acme/tiny-t5@{REVISION}").config == loaded.config


def test_hf_home_is_the_fallback_and_refs_pick_the_snapshot(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "home" / "hub"
    _cache_layout(hub, "acme/tiny-t5", checkpoint)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    (hub / "models--acme--tiny-t5" / "snapshots" / ("f" * 40)).mkdir()  # not the main ref
    assert read_model_card("acme/tiny-t5").source.endswith(REVISION)


def test_a_model_absent_from_the_cache_is_a_clear_error(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache") as info:
        load_model("acme/missing")
    assert "huggingface-cli download acme/missing" in str(info.value)
    assert "never downloads" in str(info.value)
    _cache_layout(tmp_path / "empty-hub", "acme/tiny-t5", checkpoint)
    with pytest.raises(ModelNotFoundError, match="no ref or snapshot 'v2'"):
        read_model_card("acme/tiny-t5@v2")
    with pytest.raises(ModelNotFoundError, match="expected 'exegpt-tiny-t5', a directory"):
        load_model("not a model id")
