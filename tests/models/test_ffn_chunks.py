"""Feed-forwards over many tokens run in token chunks whose intermediates stay under the heap's
mmap threshold (exegpt/models/layers.py `in_token_chunks`), with the outputs of a whole call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import exegpt.models.layers as layers
from exegpt.models.layers import GatedGeluFFN, ReluFFN, SwiGLU
from exegpt.models.loader import load_model
from exegpt.models.prepack import pack_linears
from tests.models.conftest import Checkpoint
from tests.models.helpers import PROMPTS, assert_logits_close, greedy, make_runner


def _ffns() -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each feed-forward and its output Linear (whose input rows tell the chunks)."""
    torch.manual_seed(0)
    fused = SwiGLU(32, 48)
    fused.fuse()
    relu, gelu, swiglu = ReluFFN(32, 48), GatedGeluFFN(32, 48), SwiGLU(32, 48)
    return {
        "relu": (relu, relu.wo),
        "gated-gelu": (gelu, gelu.wo),
        "swiglu": (swiglu, swiglu.down_proj),
        "swiglu-fused": (fused, fused.down_proj),
    }


@pytest.mark.parametrize(
    ("ffn", "dtype", "chunk"),
    [
        # Gated: two [tokens x 2048] bf16 intermediates, 8 KiB a token: 2048 tokens a chunk.
        (lambda: SwiGLU(8, 2048), torch.bfloat16, 2048),
        (lambda: GatedGeluFFN(8, 2048), torch.bfloat16, 2048),
        # One [tokens x 1024] float32 intermediate, 4 KiB a token: 4096 tokens a chunk.
        (lambda: ReluFFN(8, 1024), torch.float32, 4096),
    ],
)
def test_chunks_at_the_real_budget_keep_the_intermediate_within_it(ffn, dtype, chunk) -> None:
    """Half the 32 MiB mmap threshold, in tokens: the sizes the design doc gives."""
    module = ffn().to(dtype)
    output = module.wo if hasattr(module, "wo") else module.down_proj
    rows: list[int] = []
    output.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    with torch.inference_mode():
        module(torch.randn(2 * chunk + 1, 8, dtype=dtype))
    assert rows == [chunk, chunk, 1]


@pytest.mark.parametrize("name", ["relu", "gated-gelu", "swiglu", "swiglu-fused"])
@pytest.mark.parametrize("shape", [(1, 700), (3, 250)])
def test_a_long_input_runs_in_chunks_with_the_whole_calls_outputs(
    name: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """700 packed tokens (or 3 padded rows of 250) under a budget of FFN_CHUNK_MIN_TOKENS
    tokens a chunk: three chunks of at most 256 tokens, in order, and the whole call's
    output."""
    ffn, out_linear = _ffns()[name]
    x = torch.randn(*shape, 32)
    with torch.inference_mode():
        whole = ffn(x)
        rows: list[int] = []
        hook = out_linear.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
        monkeypatch.setattr(layers, "FFN_CHUNK_MAX_BYTES", 1)
        try:
            chunked = ffn(x)
        finally:
            hook.remove()
    tokens = shape[0] * shape[1]
    assert rows == [256, 256, tokens - 512]
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_short_inputs_and_other_devices_run_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the chunk size a call is one piece; off the host (here `meta`, which allocates
    nothing) too, whatever its size: the cliff is glibc's heap."""
    monkeypatch.setattr(layers, "FFN_CHUNK_MAX_BYTES", 1)
    for device, tokens in (("cpu", 256), ("meta", 5000)):
        assert _down_inputs(SwiGLU(32, 48).to(device), tokens) == [torch.Size([1, tokens, 48])]


def _down_inputs(ffn: SwiGLU, tokens: int) -> list[torch.Size]:
    """The shapes down_proj sees in one call of `ffn` over [1, tokens, 32]."""
    device = ffn.down_proj.weight.device
    shapes: list[torch.Size] = []
    ffn.down_proj.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
    with torch.inference_mode():
        ffn(torch.zeros(1, tokens, 32, device=device))
    return shapes


@pytest.mark.parametrize("variant", ["llama", "t5"])
def test_chunked_models_generate_the_same_tokens(
    checkpoints: dict[str, Checkpoint], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy generation with every feed-forward cut into 4-token chunks (packed prefills,
    T5's encoder and its padded decoder prefill included), bf16 with packed Linears as
    served, against whole calls: the same tokens and close first-step logits."""
    loaded = load_model(str(checkpoints[variant].path), dtype=torch.bfloat16)
    pack_linears(loaded.model)
    whole_runner = make_runner(loaded)
    whole = greedy(whole_runner, PROMPTS, 4)
    monkeypatch.setattr(layers, "FFN_CHUNK_MAX_BYTES", 1)
    monkeypatch.setattr(layers, "FFN_CHUNK_MIN_TOKENS", 4)
    assert greedy(make_runner(loaded), PROMPTS, 4) == whole


@pytest.mark.parametrize("variant", ["llama", "t5"])
def test_chunked_float32_logits_match(
    checkpoints: dict[str, Checkpoint], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 prefill logits with 4-token chunks against whole calls."""
    from exegpt.models.kv_cache import SequenceKV

    loaded = load_model(str(checkpoints[variant].path))
    whole = make_runner(loaded).prefill([SequenceKV() for _ in PROMPTS], PROMPTS)
    monkeypatch.setattr(layers, "FFN_CHUNK_MAX_BYTES", 1)
    monkeypatch.setattr(layers, "FFN_CHUNK_MIN_TOKENS", 4)
    chunked = make_runner(loaded).prefill([SequenceKV() for _ in PROMPTS], PROMPTS)
    assert_logits_close(chunked, whole)
