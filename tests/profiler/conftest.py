"""Shared fixtures: profiles measured once per session on the reduced grid (tests/tiny_profile.py),
and a tiny random Llama checkpoint for the decoder-only paths."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from exegpt.models.checkpoint import create_model, save_weights
from exegpt.models.config import ModelConfig
from exegpt.profile.format import ProfileData, write_profile
from services.profiler.measure.run import run_profile
from tests.tiny_profile import tiny_request

TINY_LLAMA = ModelConfig(
    family="llama",
    vocab_size=128,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    d_ff=128,
    num_encoder_layers=0,
    num_decoder_layers=2,
    ffn="swiglu",
    tie_word_embeddings=False,
    norm_eps=1e-5,
    eos_token_id=1,
    pad_token_id=0,
    bos_token_id=None,
    decoder_start_token_id=None,
    max_context_tokens=256,
)


@pytest.fixture(scope="session")
def t5_profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model profiled at TP 1 and 2 (the all-reduce across two processes)."""
    data = run_profile(tiny_request(tp_degrees=(1, 2)))
    return write_profile(data, tmp_path_factory.mktemp("profiles") / "t5.json")


@pytest.fixture(scope="session")
def t5_profile(t5_profile_path: Path) -> ProfileData:
    return ProfileData.model_validate_json(t5_profile_path.read_text())


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face style checkpoint of a tiny random Llama (GQA: 4 heads, 2 KV heads)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = create_model(TINY_LLAMA)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA.to_hf_dict()))
    save_weights(model, TINY_LLAMA, directory / "model.safetensors")
    return directory


@pytest.fixture()
def profile_json(t5_profile_path: Path) -> Iterator[dict[str, object]]:
    """A fresh, mutable copy of the session profile's JSON."""
    yield json.loads(t5_profile_path.read_text())


def with_longer_whole_forwards(data: ProfileData) -> ProfileData:
    """The profile with its whole forwards made longer by an overhead that grows with the
    batch and the length and outweighs the measurement noise: its remainders then rise with
    the size, so no floor or dip hides what the sums do."""

    def extra_s(kind: str, batch: int, length: int) -> float:
        # A prefill's remainder is what is left after its decoder step's: ten times larger,
        # it grows with the length whatever the decode overheads do.
        scale = 10.0 if kind == "prefill_whole" else 1.0
        return scale * (0.1 * batch + 0.01 * length)

    raw = data.model_dump(mode="json")
    for kind in ("prefill_whole", "decode_whole"):
        for row in raw[kind]["rows"]:
            extra = [extra_s(kind, row["batch_size"], size) for size in row["sizes"]]
            for name in ("median_s", "p10_s", "p90_s"):
                row[name] = [t + e for t, e in zip(row[name], extra, strict=True)]
    return ProfileData.model_validate(raw)


def with_whole_forwards_at(
    data: ProfileData, factor: Callable[[str, int, int], float]
) -> ProfileData:
    """The profile with each whole forward set to `factor(kind, batch, length)` times its
    parts: decode steps first, since an encoder-decoder prefill's whole includes a
    reconciled decoder step."""
    from exegpt.profile.layer_profile import LayerProfile

    raw = data.model_dump(mode="json")
    for kind in ("decode_whole", "prefill_whole"):
        profile = LayerProfile(ProfileData.model_validate(raw))
        for row in raw[kind]["rows"]:
            batch = row["batch_size"]
            for i, size in enumerate(row["sizes"]):
                if kind == "decode_whole":
                    target = factor(kind, batch, size) * profile.decode_parts_s(batch, size)
                else:
                    parts = profile.prefill_parts_s(batch, size)
                    fixed = profile.prefill_first_step_s(batch, size)
                    target = fixed + factor(kind, batch, size) * parts
                for name in ("median_s", "p10_s", "p90_s"):
                    row[name][i] = target
    return ProfileData.model_validate(raw)


def assert_sums_add_up_to_whole_forwards(data: ProfileData) -> None:
    """At every grid point the profile's sum for a whole forward equals the forward's time."""
    from exegpt.profile.layer_profile import LayerProfile
    from services.profiler.measure.validate import predict_decode_step_s, predict_prefill_s

    longer = with_longer_whole_forwards(data)
    profile = LayerProfile(longer)
    for kind in ("prefill_whole", "decode_whole"):
        for row in getattr(longer, kind).rows:
            for size, whole_s in zip(row.sizes, row.median_s, strict=True):
                if kind == "prefill_whole":
                    predicted = predict_prefill_s(profile, row.batch_size, size)
                else:
                    cross = size if data.model.is_encoder_decoder else 0
                    predicted = predict_decode_step_s(profile, row.batch_size, size, cross)
                assert predicted == pytest.approx(whole_s, rel=1e-9)
