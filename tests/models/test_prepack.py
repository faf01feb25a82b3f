"""Linears packed for oneDNN (bfloat16 on CPU) compute exactly what plain bf16 Linears do.

The packed path exists for speed only (see exegpt/models/prepack.py), so the bar is bit
equality with the unpacked model, not closeness: same logits, same greedy tokens, through
prefill and decode steps at batch sizes 1 and 4.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exegpt.models.kv_cache import SequenceKV
from exegpt.models.loader import load_model
from exegpt.models.prepack import (
    PACKED_KERNEL,
    PackedLinear,
    fuse_projections,
    linear_kernel,
    pack_linears,
)
from exegpt.models.tensor_parallel import shard_layer
from tests.models.conftest import Checkpoint
from tests.models.helpers import PROMPTS, greedy, make_runner


def test_bf16_on_this_cpu_runs_packed() -> None:
    # The machines this project runs on have oneDNN bf16 kernels (AVX512-BF16 or AMX).
    assert linear_kernel(torch.bfloat16, "cpu") == PACKED_KERNEL
    assert linear_kernel(torch.float32, "cpu") != PACKED_KERNEL


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_in_bf16(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 1000, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in [(1, 256), (4, 256), (3, 7, 256), (0, 256)]:
            x = torch.randn(*shape, dtype=torch.bfloat16)
            assert torch.equal(packed(x), linear(x)), shape


def test_packing_replaces_only_bf16_linears(checkpoints: dict[str, Checkpoint]) -> None:
    path = str(checkpoints["llama"].path)
    fp32 = load_model(path)
    assert pack_linears(fp32.model) == 0  # float32 keeps its plain Linears
    bf16 = load_model(path, dtype=torch.bfloat16)
    linears = sum(type(m) is nn.Linear for m in bf16.model.modules())
    assert linears > 0
    # q/k/v fuse into one Linear and gate/up into one: 3 fewer to pack per layer
    layers = len(bf16.model.decoder_layers)
    assert pack_linears(bf16.model) == linears - 3 * layers
    assert not any(type(m) is nn.Linear for m in bf16.model.modules())
    assert pack_linears(bf16.model) == 0  # packing twice changes nothing


@pytest.mark.parametrize("variant", ["t5", "llama", "llama-tied", "qwen2", "mistral-window"])
@pytest.mark.parametrize("batch", [1, 4])
def test_packed_model_is_bit_identical_to_plain_bf16(
    checkpoints: dict[str, Checkpoint], variant: str, batch: int
) -> None:
    path = str(checkpoints[variant].path)
    plain = make_runner(load_model(path, dtype=torch.bfloat16))
    packed_loaded = load_model(path, dtype=torch.bfloat16)
    assert pack_linears(packed_loaded.model) > 0
    packed = make_runner(packed_loaded)
    prompts = PROMPTS[:batch]
    assert greedy(packed, prompts, 6) == greedy(plain, prompts, 6)
    ours = packed.prefill([SequenceKV() for _ in prompts], prompts)
    theirs = plain.prefill([SequenceKV() for _ in prompts], prompts)
    assert torch.equal(ours, theirs)


def test_fusion_splits_a_tensor_parallel_shard_by_its_own_heads(
    checkpoints: dict[str, Checkpoint],
) -> None:
    """Fusion runs after TP slicing: a rank's fused q/k/v splits at that rank's head counts,
    and its projections and MLP give what the rank's separate Linears give."""
    loaded = load_model(str(checkpoints["llama"].path), dtype=torch.bfloat16)
    config = loaded.config
    layer = loaded.model.decoder_layers[0]
    plain = shard_layer(layer, config, 1, 2)
    fused = shard_layer(layer, config, 1, 2)
    assert fuse_projections(fused) == 2  # its attention and its MLP
    assert fused.self_attn.qkv_heads == (config.num_heads // 2, config.num_kv_heads // 2)
    torch.manual_seed(0)
    x = torch.randn(1, 5, config.d_model, dtype=torch.bfloat16)
    rope = loaded.model.rope(torch.arange(5)[None])
    with torch.inference_mode():
        want = plain.self_attn.project_qkv(x, rope)
        got = fused.self_attn.project_qkv(x, rope)
        for theirs, ours in zip(want, got, strict=True):
            assert ours.shape == theirs.shape
            assert torch.equal(ours, theirs)
        assert torch.equal(fused.mlp(x), plain.mlp(x))
