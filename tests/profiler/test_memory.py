"""Memory accounting against the model's actual tensors: sharded layer weights, the rest of
the model, and the KV pool the engine allocates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from exegpt.models.checkpoint import Model
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec
from exegpt.models.loader import load_model
from exegpt.models.tensor_parallel import shard_config, shard_layer
from exegpt.profile.layer_profile import load_profile
from services.profiler.measure.memory import memory_data


def tensor_bytes(module: nn.Module, skip_tables: bool = True) -> int:
    return sum(
        p.numel() * p.element_size()
        for name, p in module.named_parameters()
        if not (skip_tables and "relative_attention_bias" in name)
    )


def unique_parameter_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for param in model.parameters():  # tied weights are one tensor
        seen[id(param)] = param.numel() * param.element_size()
    return sum(seen.values())


def kv_pool_bytes_per_token(model: Model, tp_degree: int, dtype: torch.dtype) -> int:
    """Bytes the engine's pool really holds per token per layer on one rank."""
    spec = KVCacheSpec.for_model(shard_config(model.config, tp_degree), dtype=dtype)
    pool = KVCachePool(spec, num_blocks=3, block_size_tokens=16, device="cpu")
    layer = pool.layers[0]
    slot_bytes = layer.k[0].numel() * layer.k.element_size() * 2  # K and V of one slot
    assert layer.k.shape[0] == 3 * 16 + 1  # the blocks and the null slot
    return slot_bytes


@pytest.fixture(scope="module", params=["t5", "llama"])
def model(request: pytest.FixtureRequest, llama_dir: Path) -> Model:
    name = "exegpt-tiny-t5" if request.param == "t5" else str(llama_dir)
    return load_model(name).model


@pytest.mark.parametrize("tp_degree", [1, 2])
def test_layer_weights_are_the_shards_tensor_bytes(model: Model, tp_degree: int) -> None:
    memory = memory_data(model, torch.float32, (1, 2))
    config = model.config
    encoders = model.encoder_layers if config.is_encoder_decoder else model.decoder_layers
    for layers, measured in (
        (encoders, memory.encode_layer_weight_bytes[tp_degree]),
        (model.decoder_layers, memory.decode_layer_weight_bytes[tp_degree]),
    ):
        # The last layer: T5's first layer also owns the (replicated) position table.
        shard = shard_layer(layers[-1], config, 0, tp_degree) if tp_degree > 1 else layers[-1]
        assert measured == tensor_bytes(shard)
        if tp_degree == 1:
            assert measured == tensor_bytes(layers[0])  # the table is not in the layer's share


def test_everything_adds_up_to_the_model(model: Model) -> None:
    memory = memory_data(model, torch.float32, (1,))
    config = model.config
    num_encoders = config.num_encoder_layers if config.is_encoder_decoder else 0
    total = (
        memory.embedding_weight_bytes
        + num_encoders * memory.encode_layer_weight_bytes[1]
        + config.num_decoder_layers * memory.decode_layer_weight_bytes[1]
    )
    assert total == unique_parameter_bytes(model)


def test_sharding_splits_the_layer_weights(model: Model) -> None:
    memory = memory_data(model, torch.float32, (1, 2))
    one, two = memory.decode_layer_weight_bytes[1], memory.decode_layer_weight_bytes[2]
    assert one / 2 <= two < one  # norms (and nothing else) are replicated on every rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp_degree", [1, 2])
def test_kv_bytes_match_the_engine_pool(model: Model, tp_degree: int, dtype: torch.dtype) -> None:
    memory = memory_data(model, dtype, (1, 2))
    expected = kv_pool_bytes_per_token(model, tp_degree, dtype)
    assert memory.kv_bytes_per_token[tp_degree] == expected
    cross = memory.cross_kv_bytes_per_token[tp_degree]
    assert cross == (expected if model.config.is_encoder_decoder else 0)


def test_the_profile_reports_the_same_bytes(t5_profile_path: Path) -> None:
    profile = load_profile(t5_profile_path)
    model = load_model("exegpt-tiny-t5").model
    for tp in (1, 2):
        assert profile.kv_bytes_per_token(tp) == kv_pool_bytes_per_token(model, tp, torch.float32)
        shard = shard_layer(model.decoder_layers[-1], model.config, 0, tp) if tp > 1 else None
        expected = tensor_bytes(shard if shard is not None else model.decoder_layers[-1])
        assert profile.decode_layer_weight_bytes(tp) == expected
    assert (
        profile.embedding_weight_bytes()
        == memory_data(model, torch.float32, (1,)).embedding_weight_bytes
    )
