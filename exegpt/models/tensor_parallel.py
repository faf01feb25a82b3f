"""Megatron-style tensor parallelism: how each weight of a layer splits across ranks.

Attention heads are split across ranks: the q/k/v projections are column-parallel (each rank
projects to its own heads) and the output projection is row-parallel (each rank holds the
input columns of its heads, so its output is a partial sum that needs an all-reduce). The
feed-forward net is the same: input projections column-parallel, output projection
row-parallel. A TP layer therefore all-reduces twice: after the attention output projection
and after the feed-forward output projection.

Norms are replicated. T5's relative-position table is replicated too (it is tiny): the model
computes the position bias once per stack, and each rank takes its heads with
`shard_attention_bias`.

A rank's shard is a layer of the same class built on `shard_config` (fewer heads, narrower
feed-forward), so the existing layer code runs it unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import replace

import torch
from torch import Tensor, nn

from exegpt.models.config import ModelConfig
from exegpt.models.llama import LlamaDecoderLayer
from exegpt.models.t5 import T5DecoderLayer, T5EncoderLayer

Layer = T5EncoderLayer | T5DecoderLayer | LlamaDecoderLayer


class Split(enum.StrEnum):
    COLUMN = "column"  # nn.Linear weight [out, in]: split the output rows (dim 0)
    ROW = "row"  # split the input columns (dim 1); the layer output is a partial sum
    REPLICATE = "replicate"


# By the name of the Linear that owns the weight (the last component before ".weight").
_LINEAR_SPLITS: dict[str, Split] = {
    # T5 attention and feed-forward
    "q": Split.COLUMN,
    "k": Split.COLUMN,
    "v": Split.COLUMN,
    "o": Split.ROW,
    "wi": Split.COLUMN,
    "wi_0": Split.COLUMN,
    "wi_1": Split.COLUMN,
    "wo": Split.ROW,
    # Llama attention and SwiGLU
    "q_proj": Split.COLUMN,
    "k_proj": Split.COLUMN,
    "v_proj": Split.COLUMN,
    "o_proj": Split.ROW,
    "gate_proj": Split.COLUMN,
    "up_proj": Split.COLUMN,
    "down_proj": Split.ROW,
}


def check_tp_degree(config: ModelConfig, tp_degree: int) -> None:
    """Raise ValueError unless `tp_degree` splits the heads, KV heads and feed-forward evenly."""
    if tp_degree < 1:
        raise ValueError(f"tensor-parallel degree must be >= 1, got {tp_degree}")
    sizes = {
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "d_ff": config.d_ff,
    }
    uneven = [f"{name}={size}" for name, size in sizes.items() if size % tp_degree]
    if uneven:
        raise ValueError(
            f"tensor-parallel degree {tp_degree} does not divide {', '.join(uneven)}: "
            "each rank must get whole attention heads and an equal share of the feed-forward"
        )


def feasible_tp_degrees(config: ModelConfig, max_degree: int) -> tuple[int, ...]:
    """Every degree up to `max_degree` that shards the model evenly (always includes 1)."""
    degrees = []
    for degree in range(1, max(1, max_degree) + 1):
        try:
            check_tp_degree(config, degree)
        except ValueError:
            continue
        degrees.append(degree)
    return tuple(degrees)


def shard_config(config: ModelConfig, tp_degree: int) -> ModelConfig:
    """The config of one rank's shard: 1/tp of the heads, KV heads and feed-forward width."""
    check_tp_degree(config, tp_degree)
    return replace(
        config,
        num_heads=config.num_heads // tp_degree,
        num_kv_heads=config.num_kv_heads // tp_degree,
        d_ff=config.d_ff // tp_degree,
    )


def split_of(parameter_name: str) -> Split:
    """How the parameter named `parameter_name` (as in layer.named_parameters()) splits."""
    parts = parameter_name.split(".")
    if len(parts) < 2 or parts[-2] not in _LINEAR_SPLITS:
        return Split.REPLICATE  # norms, T5's relative-position table
    split = _LINEAR_SPLITS[parts[-2]]
    if parts[-1] == "bias":
        # A column-parallel bias [out] splits with its rows. A row-parallel bias would be
        # added once per rank before the all-reduce: no supported model has one.
        if split is Split.ROW:
            raise ValueError(f"{parameter_name}: a row-parallel Linear with a bias is unsupported")
        return split
    return split if parts[-1] == "weight" else Split.REPLICATE


def shard_tensor(tensor: Tensor, split: Split, rank: int, tp_degree: int) -> Tensor:
    """Rank `rank`'s contiguous slice of a weight (a view; no copy)."""
    if not 0 <= rank < tp_degree:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {tp_degree}")
    if split is Split.REPLICATE:
        return tensor
    dim = 0 if split is Split.COLUMN else 1
    size = tensor.shape[dim]
    if size % tp_degree:
        raise ValueError(f"dimension {dim} of size {size} does not split into {tp_degree} parts")
    part = size // tp_degree
    return tensor.narrow(dim, rank * part, part)


def shard_shapes(layer: nn.Module, tp_degree: int) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of one rank's shard (the same for every rank)."""
    return {
        name: tuple(shard_tensor(param, split_of(name), 0, tp_degree).shape)
        for name, param in layer.named_parameters()
    }


def shard_layer(layer: Layer, config: ModelConfig, rank: int, tp_degree: int) -> Layer:
    """Rank `rank`'s shard of an encoder or decoder layer: same class, sharded weights (copies).

    `config` is the unsharded model config the layer was built with.
    """
    sharded = shard_config(config, tp_degree)
    with torch.device("meta"):
        shard = _same_layer_class(layer, sharded)
    for name, param in layer.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        value = shard_tensor(param.detach(), split_of(name), rank, tp_degree).clone()
        setattr(shard.get_submodule(module_name), param_name, nn.Parameter(value, False))
    _share_position_tables(layer, shard)
    return shard.eval()


def _same_layer_class(layer: Layer, config: ModelConfig) -> Layer:
    if isinstance(layer, T5EncoderLayer):
        has_bias = layer.self_attn.relative_attention_bias is not None
        return T5EncoderLayer(config, has_relative_bias=has_bias)
    if isinstance(layer, T5DecoderLayer):
        has_bias = layer.self_attn.relative_attention_bias is not None
        return T5DecoderLayer(config, has_relative_bias=has_bias)
    if isinstance(layer, LlamaDecoderLayer):
        return LlamaDecoderLayer(config)
    raise TypeError(f"cannot shard a {type(layer).__name__}: not a known layer class")


def _share_position_tables(layer: Layer, shard: Layer) -> None:
    # The shard built its table module with its own head count; the table is replicated, so
    # replace that module with one of the unsharded size around the replica copied above.
    if isinstance(layer, T5EncoderLayer | T5DecoderLayer) and isinstance(
        shard, T5EncoderLayer | T5DecoderLayer
    ):
        table = layer.self_attn.relative_attention_bias
        copied = shard.self_attn.relative_attention_bias
        if table is not None and copied is not None:
            shard.self_attn.relative_attention_bias = nn.Embedding(
                table.num_embeddings, table.embedding_dim, _weight=copied.weight, _freeze=True
            )


def shard_attention_bias(bias: Tensor, rank: int, tp_degree: int) -> Tensor:
    """This rank's heads of an attention bias [B, H | 1, T_q, T_kv]; a shared [B, 1, ...] mask
    (or a scalar) applies to every head and is returned as is."""
    if bias.dim() != 4 or bias.shape[1] == 1:
        return bias
    num_heads = bias.shape[1]
    if num_heads % tp_degree or not 0 <= rank < tp_degree:
        raise ValueError(f"cannot give rank {rank} of {tp_degree} its share of {num_heads} heads")
    part = num_heads // tp_degree
    return bias.narrow(1, rank * part, part)  # [B, H, T_q, T_kv] -> [B, H / tp, T_q, T_kv]
