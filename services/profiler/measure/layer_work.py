"""The pieces of work the layer profiler times, built on rank 0's shard of the real layers.

Every builder returns a callable that runs one piece over every layer of a stack (or every
slice of the KV store) in layer order; time it with divide_by=len(stack) for one layer:

- the attention kernel alone, as the engine calls it (T5 encoder: `attention_kernel`; decoder
  and Llama: `paged_attention`, which writes the new K/V and gathers the cached K/V);
- the whole layer (`stack_work`): attention and rest together, as a forward runs them;
- the rest of the layer (norms, projections, feed-forward) with a stand-in attention output;
- T5's cross K/V write: each decoder layer projects the encoder output once per prefill.

The KV store has one slice per layer, filled with data: in a forward every layer gathers K/V
that no other layer just touched, so gathers larger than the caches come from memory. Timing
one layer's K/V over and over (or never-written pages, which all map to one zero page) would
read it from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from exegpt.models.attention import AttentionMetadata, LayerKV, paged_attention
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec
from exegpt.models.t5 import T5DecoderMetadata
from exegpt.models.tensor_parallel import Layer, shard_attention_bias
from services.profiler.measure.probe import LayerCall
from services.profiler.measure.timing import TimingStats

Work = Callable[[], object]

# Bytes of K/V store (all TP degrees together) the profiler may fill; with more, attention
# rotates over fewer layers' slices than the model has.
MAX_KV_STORE_BYTES = 4 * 2**30


@dataclass
class ShardSet:
    """Rank 0's shard of every layer at one TP degree, and a filled KV store for it."""

    tp_degree: int
    num_threads: int
    encode_layers: list[Layer]  # T5 encoder layers; Llama decoder layers (run as prefill)
    decode_layers: list[Layer]
    kv: list[LayerKV]  # one slice per layer (at most the model's KV layers), same slots
    is_encoder_decoder: bool

    def kv_of(self, layer_index: int) -> LayerKV:
        return self.kv[layer_index % len(self.kv)]


def kv_store(
    spec: KVCacheSpec,
    num_blocks: int,
    block_size_tokens: int,
    device: torch.device,
    max_bytes: int,
) -> list[LayerKV]:
    """Per-layer K/V slices of a pool, written once so every page holds data."""
    layer_bytes = spec.bytes_per_token() // spec.num_layers * num_blocks * block_size_tokens
    num_layers = max(1, min(spec.num_layers, max_bytes // max(1, layer_bytes)))
    pool = KVCachePool(replace(spec, num_layers=num_layers), num_blocks, block_size_tokens, device)
    for layer in pool.layers:
        layer.k.fill_(0.5)
        layer.v.fill_(0.5)
    return pool.layers


def _scale(layer: Layer) -> float:
    # Llama scales by head_dim**-0.5; T5 folds the scale into its q weights (scale 1).
    return float(getattr(layer.self_attn, "scale", 1.0))


def shard_meta(meta: AttentionMetadata, tp_degree: int) -> AttentionMetadata:
    if meta.buckets is not None:  # a T5 decode step: its self buckets' masks are per head
        buckets = tuple(
            replace(b, mask=shard_attention_bias(b.mask, 0, tp_degree)) if b.mask is not None else b
            for b in meta.buckets
        )
        return replace(meta, buckets=buckets)
    if meta.attn_bias is None:  # a packed step: no bias, its layout holds for every head
        return meta
    return replace(meta, attn_bias=shard_attention_bias(meta.attn_bias, 0, tp_degree))


def _loop(stack: list[Layer], run: Callable[[int, Layer], object]) -> Work:
    def loop() -> None:
        for index, layer in enumerate(stack):
            run(index, layer)

    return loop


# ---- attention kernels alone ------------------------------------------------------------------


def encode_kernel_work(shards: ShardSet, call: LayerCall) -> Work:
    """The attention of every encode layer (T5's encoder keeps no K/V; Llama writes it)."""
    stack, tp = shards.encode_layers, shards.tp_degree
    layer = stack[0]
    meta = shard_meta(call.meta, tp)
    if shards.is_encoder_decoder:
        q, k, v = layer.qkv(call.x)
        return _loop(stack, lambda _, __: layer.attend(q, k, v, meta))
    q, k, v = layer.qkv(call.x, meta)
    return _loop(stack, lambda i, _: layer.attend(q, k, v, shards.kv_of(i), meta))


def decode_kernel_works(shards: ShardSet, call: LayerCall) -> tuple[Work, Work | None]:
    """Self and (T5) cross attention of one decode step over every decode layer."""
    stack, tp = shards.decode_layers, shards.tp_degree
    layer = stack[0]
    if not shards.is_encoder_decoder:
        meta = shard_meta(call.meta, tp)
        q, k, v = layer.qkv(call.x, meta)
        return _loop(stack, lambda i, _: layer.attend(q, k, v, shards.kv_of(i), meta)), None
    self_meta = shard_meta(call.meta.self_attn, tp)
    cross_meta = shard_meta(call.meta.cross_attn, tp)
    q, k, v = layer.self_qkv(call.x)
    _, cross_q = layer.cross_q(call.x, paged_attention(q, k, v, shards.kv[0], self_meta, 1.0))
    return (
        _loop(stack, lambda i, _: paged_attention(q, k, v, shards.kv_of(i), self_meta, 1.0)),
        _loop(
            stack,
            lambda i, _: paged_attention(cross_q, None, None, shards.kv_of(i), cross_meta, 1.0),
        ),
    )


# ---- whole layers -----------------------------------------------------------------------------


def stack_work(shards: ShardSet, call: LayerCall, decode: bool) -> Work:
    """Every layer of the stack run whole on the recorded input (each on the same input: the
    cost does not depend on the values, and a shard's output is only a partial sum)."""
    tp = shards.tp_degree
    if decode:
        stack = shards.decode_layers
        if shards.is_encoder_decoder:
            meta = T5DecoderMetadata(
                shard_meta(call.meta.self_attn, tp), shard_meta(call.meta.cross_attn, tp)
            )
        else:
            meta = shard_meta(call.meta, tp)
        return _loop(stack, lambda i, layer: layer(call.x, shards.kv_of(i), meta))
    meta = shard_meta(call.meta, tp)
    if shards.is_encoder_decoder:
        return _loop(shards.encode_layers, lambda _, layer: layer(call.x, meta))
    return _loop(shards.encode_layers, lambda i, layer: layer(call.x, shards.kv_of(i), meta))


def rest_work(
    shards: ShardSet, x: Tensor, decode: bool, rope: tuple[Tensor, Tensor] | None
) -> Work:
    """Everything but attention in every layer of the stack, for the input `x` [B, T, d]."""
    stack = shards.decode_layers if decode else shards.encode_layers
    if shards.is_encoder_decoder and decode:
        attn = stack[0].self_qkv(x)[0]  # stands in for the attention output [B, T, H, D]

        def t5_decoder(_: int, layer: Layer) -> None:
            layer.self_qkv(x)
            y, _ = layer.cross_q(x, attn)
            layer.finish(y, attn)

        return _loop(stack, t5_decoder)
    if shards.is_encoder_decoder:
        attn = stack[0].qkv(x)[0]
        return _loop(stack, lambda _, layer: (layer.qkv(x), layer.finish(x, attn)))
    meta = AttentionMetadata(attn_bias=x.new_zeros(()), rope=rope)
    attn = stack[0].qkv(x, meta)[0]
    return _loop(stack, lambda _, layer: (layer.qkv(x, meta), layer.finish(x, attn)))


def cross_kv_work(shards: ShardSet, encoder_out: Tensor) -> Work:
    """T5: every decoder layer projects the encoder output [1, T, d] into its cross K/V."""
    num_tokens = encoder_out.shape[1]
    slots = torch.arange(num_tokens, device=encoder_out.device)
    meta = AttentionMetadata(
        attn_bias=encoder_out.new_zeros(()), write_slots=slots, write_rows=slots
    )
    return _loop(
        shards.decode_layers,
        lambda i, layer: layer.write_cross_kv(encoder_out, shards.kv_of(i), meta),
    )


def in_layer_attention(stack: TimingStats, rest: TimingStats, kernel: TimingStats) -> TimingStats:
    """Attention as a forward pays for it: the whole layer minus the rest of it.

    Kernels timed alone run from warm caches and a warm allocator; inside a layer the same
    gathers and kernels can cost several times more. The whole-layer time minus the rest
    (both taken back to back at the same point) keeps that, and is never taken below the
    kernel alone, which noise could otherwise push it under.
    """
    value = stack.median_s - rest.median_s
    if value <= kernel.median_s:
        return kernel
    return TimingStats(
        median_s=value,
        p10_s=max(kernel.p10_s, stack.p10_s - rest.median_s),
        p90_s=max(value, stack.p90_s - rest.median_s),
        num_repeats=stack.num_repeats,
        samples_s=tuple(max(kernel.median_s, s - rest.median_s) for s in stack.samples_s),
    )
