"""Exact memory per device: layer weights as the TP worker shards them, and KV per token."""

from __future__ import annotations

import math

import torch
from torch import nn

from exegpt.models.checkpoint import Model
from exegpt.models.config import ModelConfig
from exegpt.models.tensor_parallel import shard_config, shard_shapes
from exegpt.profile.format import MemoryData

_LAYER_LISTS = ("encoder_layers.", "decoder_layers.")
_REPLICATED_TABLE = "relative_attention_bias."  # T5: owned by a stack's first layer, shared


def _is_table(name: str) -> bool:
    return _REPLICATED_TABLE in name


def layer_weight_bytes(layer: nn.Module, tp_degree: int) -> int:
    """Bytes of one rank's shard of a layer, without T5's shared position table."""
    dtypes = {name: param.dtype for name, param in layer.named_parameters()}
    return sum(
        math.prod(shape) * dtypes[name].itemsize
        for name, shape in shard_shapes(layer, tp_degree).items()
        if not _is_table(name)
    )


def embedding_weight_bytes(model: Model) -> int:
    """Everything outside the per-layer weights: embedding, LM head (once if tied), final
    norms, and T5's relative-position tables (replicated on every TP rank)."""
    return sum(
        param.numel() * param.dtype.itemsize
        for name, param in model.named_parameters()  # tied weights are listed once
        if not name.startswith(_LAYER_LISTS) or _is_table(name)
    )


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp_degree: int) -> int:
    """K and V of one token in one layer on one rank (the rank holds its KV heads)."""
    sharded = shard_config(config, tp_degree)
    return 2 * sharded.num_kv_heads * sharded.head_dim * dtype.itemsize


def memory_data(model: Model, kv_dtype: torch.dtype, tp_degrees: tuple[int, ...]) -> MemoryData:
    config = model.config
    encode_layer = (model.encoder_layers if config.is_encoder_decoder else model.decoder_layers)[-1]
    decode_layer = model.decoder_layers[-1]
    kv = {tp: kv_bytes_per_token(config, kv_dtype, tp) for tp in tp_degrees}
    return MemoryData(
        encode_layer_weight_bytes={tp: layer_weight_bytes(encode_layer, tp) for tp in tp_degrees},
        decode_layer_weight_bytes={tp: layer_weight_bytes(decode_layer, tp) for tp in tp_degrees},
        embedding_weight_bytes=embedding_weight_bytes(model),
        kv_bytes_per_token=kv,
        # T5 keeps each decoder layer's K/V of the encoder output in the same pool layout.
        cross_kv_bytes_per_token={
            tp: kv[tp] if config.is_encoder_decoder else 0 for tp in tp_degrees
        },
    )
