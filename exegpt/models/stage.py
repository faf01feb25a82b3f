"""Cut a loaded model into one pipeline stage, optionally one tensor-parallel rank of it.

A stage is a model of the same family whose layer lists hold only its slice (sharing the
loaded weights, or holding this rank's shards of them), so the family's own `encode`,
`prefill` and `decode` run it unchanged: the first stage of a pass embeds its tokens, a later
one continues from the hidden states it receives, and only the stage that ends the decoder
applies the head. The whole model is the one stage that holds every layer.

Tensor parallelism follows gpt-fast: `shard_layer` gives each rank its heads and its share
of the feed-forward, and a forward hook all-reduces the output of every row-parallel
projection (attention output, feed-forward output) over the stage's torch.distributed group.
Embedding, norms and head are replicated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from exegpt.models.checkpoint import Model
from exegpt.models.kv_cache import KVCacheSpec
from exegpt.models.stage_spec import LayerRange, StageSpec
from exegpt.models.t5 import PositionTables, T5Model
from exegpt.models.tensor_parallel import Split, shard_config, shard_layer, split_of

AllReduce = Callable[[Tensor], None]  # sums a tensor in place over the stage's TP group


def build_stage(model: Model, spec: StageSpec, all_reduce: AllReduce | None = None) -> Model:
    """The part of `model` that `spec` names, as a model of the same class (eval mode)."""
    config = model.config
    spec.check(config)
    if spec.tp_degree > 1 and all_reduce is None:
        raise ValueError("a tensor-parallel stage needs an all-reduce over its group")
    stage = type(model).__new__(type(model))
    nn.Module.__init__(stage)
    stage.config = config
    first = spec.embeds_encoder() or spec.embeds_decoder()
    last = spec.ends_decoder(config)
    stage.embed = model.embed if first or (last and config.tie_word_embeddings) else None
    stage.encoder_layers = _layers(
        model, model.encoder_layers, spec, spec.encoder_layers, all_reduce
    )
    stage.decoder_layers = _layers(
        model, model.decoder_layers, spec, spec.decoder_layers, all_reduce
    )
    stage.lm_head = model.lm_head if last else None
    stage.has_head = last
    if isinstance(model, T5Model):
        stage.ends_encoder = spec.ends_encoder(config)
        stage.encoder_final_norm = model.encoder_final_norm if stage.ends_encoder else None
        stage.decoder_final_norm = model.decoder_final_norm if last else None
        stage.position_tables = PositionTables(
            _head_shard(model.position_tables.encoder, spec) if len(spec.encoder_layers) else None,
            _head_shard(model.position_tables.decoder, spec) if len(spec.decoder_layers) else None,
        )
    else:
        stage.final_norm = model.final_norm if last else None
    return stage.eval()


def stage_kv_spec(model: Model, spec: StageSpec, dtype: torch.dtype) -> KVCacheSpec:
    """The KV a stage keeps: its own decoder layers, its rank's KV heads."""
    config = shard_config(model.config, spec.tp_degree)
    return KVCacheSpec(len(spec.decoder_layers), config.num_kv_heads, config.head_dim, dtype)


def _layers(
    model: Model,
    stack: nn.ModuleList,
    spec: StageSpec,
    held: LayerRange,
    all_reduce: AllReduce | None,
) -> nn.ModuleList:
    chosen = list(stack)[held.as_slice()]
    if spec.tp_degree == 1:
        return nn.ModuleList(chosen)
    assert all_reduce is not None
    shards = [shard_layer(layer, model.config, spec.tp_rank, spec.tp_degree) for layer in chosen]
    for shard in shards:
        for name, module in shard.named_modules():
            if isinstance(module, nn.Linear) and split_of(f"{name}.weight") is Split.ROW:
                # The rank's output is a partial sum over its heads / feed-forward columns.
                module.register_forward_hook(_summing_hook(all_reduce))
    return nn.ModuleList(shards)


def _summing_hook(all_reduce: AllReduce) -> Callable[[nn.Module, object, Tensor], Tensor]:
    def hook(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
        all_reduce(output)
        return output

    return hook


def _head_shard(table: nn.Embedding | None, spec: StageSpec) -> nn.Embedding | None:
    """This rank's heads of a T5 position table [buckets, H] (the bias is per head)."""
    if table is None or spec.tp_degree == 1:
        return table
    num_heads = table.embedding_dim
    part = num_heads // spec.tp_degree
    weight = table.weight.detach()[:, spec.tp_rank * part : (spec.tp_rank + 1) * part].clone()
    return nn.Embedding(table.num_embeddings, part, _weight=weight, _freeze=True)
