"""Shared fixtures: a reduced grid (seconds, not minutes), profiles measured once per session
with it, and a tiny random Llama checkpoint for the decoder-only paths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from exegpt.models.checkpoint import create_model, save_weights
from exegpt.models.config import ModelConfig
from services.profiler.grid import ProfileGrid
from services.profiler.profile_format import ProfileData, write_profile
from services.profiler.profiling import ProfileRequest, run_profile

# Small enough that a TP-1 profile of the default model takes about a second.
TINY_GRID = ProfileGrid(
    batch_sizes=(1, 2),
    seq_lens_tokens=(8, 32),
    kv_lens_tokens=(1, 16),
    num_tokens=(1, 4, 32),
    message_bytes=(1024, 65536),
    num_warmup=1,
    num_repeats=3,
    max_measure_s=0.05,
)

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


def tiny_request(**overrides: object) -> ProfileRequest:
    options: dict[str, object] = {"grid_name": "tiny", "grid": TINY_GRID, "tp_degrees": (1,)}
    options.update(overrides)
    return ProfileRequest(**options)  # type: ignore[arg-type]


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
