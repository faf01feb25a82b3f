"""Time the model's building blocks: attention and the rest of each layer, per TP degree.

For every grid point a probe step (services/profiler/probe.py) runs everything outside the
layers through the engine's own ModelRunner; that time is the per-forward overhead, and the
inputs it recorded for the layers are replayed through rank 0's shard of the real layers:

- attention: the kernel alone, as the engine calls it (T5 encoder: `attention_kernel`; decoder
  and Llama: `paged_attention`, which writes the new K/V and gathers the cached K/V);
- rest: everything else in the layer (norms, projections, feed-forward), timed over a loop
  through every layer of the stack so weights stream through the caches as in a forward;
- T5's cross K/V write: each decoder layer projects the encoder output once per prefill.

Each TP degree runs with `threads // tp` torch threads: the threads one rank would have.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from exegpt.models.attention import AttentionMetadata, LayerKV, attention_kernel, paged_attention
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, blocks_for
from exegpt.models.loader import LoadedModel
from exegpt.models.tensor_parallel import Layer, shard_attention_bias, shard_layer
from services.profiler.grid import ProfileGrid
from services.profiler.probe import LayerCall, Probe, blocks_for_grid
from services.profiler.timing import Series, Timer

StepCallback = Callable[[str], None]  # called after each measured point with the stage name
Work = Callable[[], object]


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class ShardSet:
    """Rank 0's shard of every layer at one TP degree, and a one-layer KV store for it."""

    tp_degree: int
    num_threads: int
    encode_layers: list[Layer]  # T5 encoder layers; Llama decoder layers (run as prefill)
    decode_layers: list[Layer]
    kv: LayerKV


@dataclass
class LayerMeasurements:
    compute: dict[int, dict[str, Series]] = field(default_factory=dict)  # tp -> name -> series
    prefill_forward: Series = field(default_factory=Series)  # probe prefill over (B, S)
    decode_forward: Series = field(default_factory=Series)  # probe decode over (B, L)
    embedding: Series = field(default_factory=Series)
    lm_head: Series = field(default_factory=Series)


def _scale(layer: Layer) -> float:
    # Llama scales by head_dim**-0.5; T5 folds the scale into its q weights (scale 1).
    return float(getattr(layer.self_attn, "scale", 1.0))


def _shard_meta(meta: AttentionMetadata, tp_degree: int) -> AttentionMetadata:
    return replace(meta, attn_bias=shard_attention_bias(meta.attn_bias, 0, tp_degree))


class LayerProfiler:
    def __init__(
        self,
        loaded: LoadedModel,
        grid: ProfileGrid,
        tp_degrees: tuple[int, ...],
        num_threads: int,
        block_size_tokens: int = 16,
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.grid = grid
        self.timer = Timer(loaded.device, grid.num_warmup, grid.num_repeats)
        self.num_threads = num_threads
        self.encode_points = grid.encode_points(self.config.num_heads)
        self.decode_points = grid.decode_points()
        num_blocks = max(
            blocks_for_grid(
                self.config.is_encoder_decoder,
                self.encode_points,
                self.decode_points,
                block_size_tokens,
            ),
            blocks_for(max(grid.num_tokens), block_size_tokens),
        )
        self.probe = Probe(loaded, num_blocks, block_size_tokens)
        self.shards = {tp: self._shard_set(tp, num_blocks, block_size_tokens) for tp in tp_degrees}

    def _shard_set(self, tp_degree: int, num_blocks: int, block_size_tokens: int) -> ShardSet:
        model, config = self.loaded.model, self.config
        decoders: list[Layer] = list(model.decoder_layers)
        encoders: list[Layer] = list(model.encoder_layers) if config.is_encoder_decoder else []
        if tp_degree == 1:
            kv = self.probe.pool.layers[0]
        else:
            decoders = [shard_layer(layer, config, 0, tp_degree) for layer in decoders]
            encoders = [shard_layer(layer, config, 0, tp_degree) for layer in encoders]
            spec = KVCacheSpec(
                1, config.num_kv_heads // tp_degree, config.head_dim, self.loaded.dtype
            )
            kv = KVCachePool(spec, num_blocks, block_size_tokens, self.loaded.device).layers[0]
        return ShardSet(
            tp_degree,
            max(1, self.num_threads // tp_degree),
            encoders if config.is_encoder_decoder else decoders,
            decoders,
            kv,
        )

    def num_steps(self) -> int:
        num_sizes = len(self.grid.num_tokens)
        return (
            len(self.encode_points)
            + len(self.decode_points)
            + len(self.shards) * num_sizes
            + num_sizes
        )

    @torch.inference_mode()
    def run(self, on_step: StepCallback) -> LayerMeasurements:
        result = LayerMeasurements()
        for tp in self.shards:
            result.compute[tp] = {
                name: Series()
                for name in (
                    "encode_attention",
                    "encode_rest",
                    "cross_kv_write",
                    "decode_self_attention",
                    "decode_cross_attention",
                    "decode_rest",
                )
            }
        for batch, seq_len in self.encode_points:
            self._encode_point(batch, seq_len, result)
            on_step("encode attention")
        for batch, kv_len in self.decode_points:
            self._decode_point(batch, kv_len, result)
            on_step("decode attention")
        for shards in self.shards.values():
            for num_tokens in self.grid.num_tokens:
                self._rest_point(shards, num_tokens, result.compute[shards.tp_degree])
                on_step(f"rest of layer, TP {shards.tp_degree}")
        for num_tokens in self.grid.num_tokens:
            self._embedding_point(num_tokens, result)
            on_step("embedding and LM head")
        return result

    # ---- attention (and the per-forward overhead around it) ---------------------------------

    def _encode_point(self, batch: int, seq_len: int, result: LayerMeasurements) -> None:
        step = self.probe.steps.prefill_step(batch, seq_len)
        result.prefill_forward.add((batch, seq_len), self.timer.measure(step))
        kind = "encoder" if self.config.is_encoder_decoder else "decoder"
        call = self.probe.recorded(kind)
        for tp, shards in self.shards.items():
            with torch_threads(shards.num_threads):
                work = self._encode_attention(shards, call)
                stats = self.timer.measure(work)
            result.compute[tp]["encode_attention"].add((batch, seq_len), stats)

    def _encode_attention(self, shards: ShardSet, call: LayerCall) -> Work:
        layer, tp = shards.encode_layers[0], shards.tp_degree
        if self.config.is_encoder_decoder:
            q, k, v = layer.qkv(call.x)
            bias = shard_attention_bias(call.meta.attn_bias, 0, tp)
            return lambda: attention_kernel(q, k, v, bias, _scale(layer))
        meta = _shard_meta(call.meta, tp)
        q, k, v = layer.qkv(call.x, meta)
        return lambda: layer.attend(q, k, v, shards.kv, meta)

    def _decode_point(self, batch: int, kv_len: int, result: LayerMeasurements) -> None:
        seqs = self.probe.steps.decode_sequences(batch, kv_len, kv_len)
        try:
            overhead = self.timer.measure(self.probe.steps.decode_step(seqs))
            result.decode_forward.add((batch, kv_len), overhead)
            call = self.probe.recorded("decoder")
            for tp, shards in self.shards.items():
                series = result.compute[tp]
                with torch_threads(shards.num_threads):
                    self_work, cross_work = self._decode_attention(shards, call)
                    stats = self.timer.measure(self_work)
                    series["decode_self_attention"].add((batch, kv_len), stats)
                    if cross_work is not None:
                        stats = self.timer.measure(cross_work)
                        series["decode_cross_attention"].add((batch, kv_len), stats)
        finally:
            self.probe.steps.release(seqs)

    def _decode_attention(self, shards: ShardSet, call: LayerCall) -> tuple[Work, Work | None]:
        layer, tp, kv = shards.decode_layers[0], shards.tp_degree, shards.kv
        if not self.config.is_encoder_decoder:
            meta = _shard_meta(call.meta, tp)
            q, k, v = layer.qkv(call.x, meta)
            return lambda: layer.attend(q, k, v, kv, meta), None
        self_meta = _shard_meta(call.meta.self_attn, tp)
        cross_meta = _shard_meta(call.meta.cross_attn, tp)
        q, k, v = layer.self_qkv(call.x)
        _, cross_q = layer.cross_q(call.x, paged_attention(q, k, v, kv, self_meta, 1.0))
        return (
            lambda: paged_attention(q, k, v, kv, self_meta, 1.0),
            lambda: paged_attention(cross_q, None, None, kv, cross_meta, 1.0),
        )

    # ---- rest of the layer, T5 cross K/V, embedding and head ---------------------------------

    def _rope_meta(self, x: Tensor) -> AttentionMetadata:
        """Metadata with rotary tables for a Llama rest-of-layer call (T5 needs none)."""
        batch, num_tokens = x.shape[:2]
        positions = torch.arange(num_tokens, device=x.device)[None].expand(batch, -1)
        rope = self.loaded.model.rope(positions) if not self.config.is_encoder_decoder else None
        return AttentionMetadata(attn_bias=x.new_zeros(()), rope=rope)

    def _tokens(self, batch: int, num_tokens: int) -> Tensor:
        ids = self.probe.steps.prompts(batch, num_tokens)
        return torch.tensor(ids, dtype=torch.long, device=self.loaded.device)

    def _rest_point(self, shards: ShardSet, num_tokens: int, series: dict[str, Series]) -> None:
        embed = self.loaded.model.embed
        with torch_threads(shards.num_threads):
            encode_x = embed(self._tokens(1, num_tokens))  # [1, T, d_model]
            decode_x = embed(self._tokens(num_tokens, 1))  # [B = T, 1, d_model]
            for name, x, stack in (
                ("encode_rest", encode_x, shards.encode_layers),
                ("decode_rest", decode_x, shards.decode_layers),
            ):
                work = self._rest_work(stack, x, decode=name == "decode_rest")
                stats = self.timer.measure(work, divide_by=len(stack))
                series[name].add((num_tokens,), stats)
            if self.config.is_encoder_decoder:
                work = self._cross_kv_work(shards, encode_x)
                stats = self.timer.measure(work, divide_by=len(shards.decode_layers))
                series["cross_kv_write"].add((num_tokens,), stats)

    def _rest_work(self, stack: list[Layer], x: Tensor, decode: bool) -> Work:
        meta = self._rope_meta(x)
        t5 = self.config.is_encoder_decoder
        if t5 and decode:
            attn = stack[0].self_qkv(x)[0]  # stands in for the attention output [B, T, H, D]

            def t5_decoder() -> None:
                for layer in stack:
                    layer.self_qkv(x)
                    y, _ = layer.cross_q(x, attn)
                    layer.finish(y, attn)

            return t5_decoder
        attn = stack[0].qkv(x)[0] if t5 else stack[0].qkv(x, meta)[0]

        def one_pass() -> None:
            for layer in stack:
                if t5:
                    layer.qkv(x)
                else:
                    layer.qkv(x, meta)
                layer.finish(x, attn)

        return one_pass

    def _cross_kv_work(self, shards: ShardSet, encoder_out: Tensor) -> Work:
        num_tokens = encoder_out.shape[1]
        slots = torch.arange(num_tokens, device=encoder_out.device)
        meta = AttentionMetadata(
            attn_bias=encoder_out.new_zeros(()), write_slots=slots, write_rows=slots
        )

        def write_all() -> None:
            for layer in shards.decode_layers:
                layer.write_cross_kv(encoder_out, shards.kv, meta)

        return write_all

    def _embedding_point(self, num_tokens: int, result: LayerMeasurements) -> None:
        model = self.loaded.model
        tokens = self._tokens(1, num_tokens)
        result.embedding.add((num_tokens,), self.timer.measure(lambda: model.embed(tokens)))
        hidden = model.embed(tokens)[0]  # [T, d_model]
        result.lm_head.add((num_tokens,), self.timer.measure(lambda: model.logits(hidden)))
