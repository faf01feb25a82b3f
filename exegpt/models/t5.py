"""T5 encoder-decoder (original and v1.1 / Flan-T5) over a paged KV cache.

Each layer is split into projections/norms/FFN ("rest of layer") and the attention kernel, so
they can be timed apart. Relative position bias is computed once per stack from the first
layer's table and shared by all layers through the attention metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from exegpt.models import paged_decode
from exegpt.models.attention import (
    AttentionMetadata,
    LayerKV,
    attention_bias,
    attention_kernel,
    mask_value,
    packed_rows_attention,
    paged_attention,
    write_kv,
)
from exegpt.models.batch import DecodeBatch, KVIndex, PrefillBatch
from exegpt.models.config import ModelConfig
from exegpt.models.decode_buckets import (
    DECODE_BUCKET_PADDING,
    DecodeBucket,
    padded_decode_buckets,
)
from exegpt.models.layers import (
    RMSNorm,
    build_ffn,
    causal_distance_bias,
    embedding,
    relative_position_bias,
)

_SCALE = 1.0  # T5 folds 1/sqrt(d) into the initialisation of q


@dataclass(frozen=True)
class PositionTables:
    """Each stack's relative-position table (its first layer's), kept apart from the layer
    list so that a pipeline stage without that layer still computes the bias."""

    encoder: nn.Embedding | None
    decoder: nn.Embedding | None
    # decoder_by_distance's cache: (what it was made from, the table).
    _by_distance: list = field(default_factory=list, init=False, repr=False, compare=False)

    def decoder_by_distance(self, max_distance: int, dtype: torch.dtype | None) -> Tensor:
        """The decoder's position bias by distance (layers.causal_distance_bias) in `dtype`
        (None: the weights'), [max_distance + 2, H]: rows 0..max_distance by distance, and a
        last row for a hidden key (the weights' dtype's mask value, finite in it and in
        float32). Made once per version of the table's weights, not bucketed every step."""
        if self.decoder is None:
            raise ValueError("this stage holds no position table for the stack it runs")
        weight = self.decoder.weight
        key = (weight.device, weight.dtype, weight.data_ptr(), weight._version, max_distance, dtype)
        if not self._by_distance or self._by_distance[0] != key:
            by_distance = causal_distance_bias(self.decoder, max_distance).detach()
            hidden = by_distance.new_full((1, by_distance.shape[1]), mask_value(weight.dtype))
            self._by_distance[:] = [key, torch.cat([by_distance, hidden]).to(dtype or weight.dtype)]
        return self._by_distance[1]


class T5Attention(nn.Module):
    def __init__(self, config: ModelConfig, has_relative_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        inner = config.num_heads * config.head_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = (
            embedding(config.relative_attention_num_buckets, config.num_heads)
            if has_relative_bias
            else None
        )

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)  # [B, T, H*D] -> [B, T, H, D]

    def project_q(self, x: Tensor) -> Tensor:
        return self._heads(self.q(x))

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.k(x)), self._heads(self.v(x))

    def project_out(self, attn: Tensor) -> Tensor:
        return self.o(attn.flatten(2))  # [B, T, H, D] -> [B, T, H*D] -> [B, T, d_model]


class T5EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, has_relative_bias: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = T5Attention(config, has_relative_bias)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = build_ffn(config)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.attn_norm(x)
        return (self.self_attn.project_q(h), *self.self_attn.project_kv(h))

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        x = x + self.self_attn.project_out(attn)
        return x + self.ffn(self.ffn_norm(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata) -> Tensor:
        if meta.attn_bias is None:
            raise ValueError("T5 encoder attention needs its position bias")
        if meta.row_lengths is None:  # padded rows [B, S]
            return attention_kernel(q, k, v, meta.attn_bias, _SCALE)
        return packed_rows_attention(q, k, v, meta.attn_bias, meta.row_lengths, _SCALE)

    def forward(self, x: Tensor, meta: AttentionMetadata) -> Tensor:
        q, k, v = self.qkv(x)
        return self.finish(x, self.attend(q, k, v, meta))


@dataclass(frozen=True)
class T5DecoderMetadata:
    self_attn: AttentionMetadata
    cross_attn: AttentionMetadata  # reads the encoder K/V written at prefill


class T5DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, has_relative_bias: bool) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = T5Attention(config, has_relative_bias)
        self.cross_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.cross_attn = T5Attention(config, has_relative_bias=False)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = build_ffn(config)

    def write_cross_kv(self, encoder_out: Tensor, kv: LayerKV, meta: AttentionMetadata) -> None:
        """Project the encoder output once and store it in the sequences' cross blocks."""
        k, v = self.cross_attn.project_kv(encoder_out)
        write_kv(kv, k, v, meta)

    def self_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.self_attn_norm(x)
        return (self.self_attn.project_q(h), *self.self_attn.project_kv(h))

    def cross_q(self, x: Tensor, self_attn: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.self_attn.project_out(self_attn)
        return x, self.cross_attn.project_q(self.cross_attn_norm(x))

    def finish(self, x: Tensor, cross_attn: Tensor) -> Tensor:
        x = x + self.cross_attn.project_out(cross_attn)
        return x + self.ffn(self.ffn_norm(x))

    def forward(self, x: Tensor, kv: LayerKV, meta: T5DecoderMetadata) -> Tensor:
        q, k, v = self.self_qkv(x)
        x, q = self.cross_q(x, paged_attention(q, k, v, kv, meta.self_attn, _SCALE))
        return self.finish(x, paged_attention(q, None, None, kv, meta.cross_attn, _SCALE))


class T5Model(nn.Module):
    # A decode step's rows share a bucket while their KV length is at least (1 - this) x the
    # bucket's longest (exegpt/models/decode_buckets.py); benchmarks/t5_decode_step.py compares
    # bounds.
    decode_bucket_padding: float = DECODE_BUCKET_PADDING
    # ... or at most this many keys shorter than it (None: DECODE_BUCKET_MIN_PADDING)
    decode_bucket_min_padding: int | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "t5":
            raise ValueError(f"T5Model needs a t5 config, got {config.family!r}")
        self.config = config
        self.embed = embedding(config.vocab_size, config.d_model)
        self.encoder_layers = nn.ModuleList(
            T5EncoderLayer(config, has_relative_bias=i == 0)
            for i in range(config.num_encoder_layers)
        )
        self.encoder_final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder_layers = nn.ModuleList(
            T5DecoderLayer(config, has_relative_bias=i == 0)
            for i in range(config.num_decoder_layers)
        )
        self.decoder_final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # A pipeline stage holds a slice of each stack: the flags say which ends it holds, and
        # the position tables (owned by each stack's first layer) are kept for every stage.
        self.ends_encoder = True
        self.has_head = True
        self.position_tables = PositionTables(
            self.encoder_layers[0].self_attn.relative_attention_bias
            if config.num_encoder_layers
            else None,
            self.decoder_layers[0].self_attn.relative_attention_bias,
        )
        self.tie_weights()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The weights' dtype (a pipeline stage may hold no embedding: any parameter tells)."""
        return next(self.parameters()).dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    # ---- position bias (first layer of each stack owns the table) --------------------------

    def _position_bias(
        self, table: nn.Embedding | None, q_pos: Tensor, k_pos: Tensor, bidirectional: bool
    ) -> Tensor:
        if table is None:
            raise ValueError("this stage holds no position table for the stack it runs")
        return relative_position_bias(
            table, q_pos, k_pos, bidirectional, self.config.relative_attention_max_distance
        )

    def decoder_self_bias(self, q_pos: Tensor, kv_lengths: Tensor, num_kv: int) -> Tensor:
        """Causal position bias plus length mask: [B, H, T_q, T_kv] for query positions [B, T_q]."""
        k_pos = torch.arange(num_kv, device=q_pos.device)[None]  # [1, T_kv]
        table = self.position_tables.decoder
        bias = self._position_bias(table, q_pos, k_pos, bidirectional=False)
        mask = attention_bias(q_pos, kv_lengths, num_kv, causal=True, dtype=bias.dtype)
        return bias + mask

    # ---- stacks ----------------------------------------------------------------------------

    def encode(self, tokens: Tensor, lengths: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Encoder output [1, N, d_model] for prompts packed back to back: tokens [N], their
        lengths [B]. Each prompt attends to itself alone (no work on padding).

        A stage runs its slice of the encoder over `hidden` (or the embedded tokens when it
        holds the first layer) and normalises only when it holds the last one.
        """
        row_lengths = tuple(lengths.tolist())  # one host read per step
        pos = torch.arange(max(row_lengths), device=tokens.device)[None]  # [1, S_max]
        table = self.position_tables.encoder
        bias = self._position_bias(table, pos, pos, bidirectional=True)  # [1, H, S, S]
        meta = AttentionMetadata(attn_bias=bias, row_lengths=row_lengths)
        x = self.embed(tokens[None]) if hidden is None else hidden  # [1, N, d_model]
        for layer in self.encoder_layers:
            x = layer(x, meta)
        return self.encoder_final_norm(x) if self.ends_encoder else x

    def write_cross_kv(self, encoder_out: Tensor, cross: KVIndex, kv: Sequence[LayerKV]) -> None:
        meta = AttentionMetadata(
            attn_bias=encoder_out.new_zeros(()),
            write_slots=cross.write_slots,
            write_rows=cross.write_rows,
        )
        for layer, layer_kv in zip(self.decoder_layers, kv, strict=True):
            layer.write_cross_kv(encoder_out, layer_kv, meta)

    def run_decoder(
        self,
        tokens: Tensor,
        hidden: Tensor | None,
        kv: Sequence[LayerKV],
        meta: T5DecoderMetadata,
    ) -> Tensor:
        x = self.embed(tokens) if hidden is None else hidden
        for layer, layer_kv in zip(self.decoder_layers, kv, strict=True):
            x = layer(x, layer_kv, meta)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        hidden = self.decoder_final_norm(hidden)
        if self.config.tie_word_embeddings:
            hidden = hidden * self.config.d_model**-0.5  # original T5 rescales for the tied head
        return self.lm_head(hidden).float()

    def _cross_meta(
        self, cross: KVIndex, num_queries: int, dtype: torch.dtype
    ) -> AttentionMetadata:
        assert cross.read_slots is not None
        q_pos = torch.zeros(1, num_queries, dtype=torch.long, device=cross.lengths.device)
        bias = attention_bias(q_pos, cross.lengths, cross.read_slots.shape[1], False, dtype)
        return AttentionMetadata(attn_bias=bias, read_slots=cross.read_slots)

    # ---- batch steps -----------------------------------------------------------------------

    def prefill(
        self,
        batch: PrefillBatch,
        kv: Sequence[LayerKV],
        hidden: Tensor | None = None,
        encoder_out: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, vocab] of the first decoder step (the whole model), or the decoder slice
        of a stage: `encoder_out` given, hidden states [B, T, d_model] out unless it ends."""
        if batch.encoder_tokens is None or batch.encoder_lengths is None or batch.cross_kv is None:
            raise ValueError("a T5 prefill needs encoder tokens and cross KV slots")
        if encoder_out is None:
            encoder_out = self.encode(batch.encoder_tokens, batch.encoder_lengths)
        self.write_cross_kv(encoder_out, batch.cross_kv, kv)
        num_tokens = batch.tokens.shape[1]
        q_pos = torch.arange(num_tokens, device=batch.tokens.device)[None]  # [1, T]
        self_meta = AttentionMetadata(
            attn_bias=self.decoder_self_bias(q_pos, batch.lengths, num_tokens),
            write_slots=batch.self_kv.write_slots,
            write_rows=batch.self_kv.write_rows,
        )
        meta = T5DecoderMetadata(
            self_meta, self._cross_meta(batch.cross_kv, num_tokens, encoder_out.dtype)
        )
        hidden = self.run_decoder(batch.tokens, hidden, kv, meta)  # [B, T, d_model]
        if not self.has_head:
            return hidden
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.logits(hidden[rows, batch.lengths - 1])  # last valid position of each row

    def decode(
        self, batch: DecodeBatch, kv: Sequence[LayerKV], hidden: Tensor | None = None
    ) -> Tensor:
        """Logits [B, vocab] of one decode step (hidden states [B, 1, d_model] for a stage
        without the head). Rows are bucketed by KV length, separately for self and cross
        attention, so each reads its own keys and at most a bounded share of padding."""
        if batch.cross_kv is None or batch.self_kv.read_slots is None:
            raise ValueError("a T5 decode step needs self and cross KV slots")
        assert batch.cross_kv.read_slots is not None
        block_size = kv[0].block_size_tokens if kv else 1
        pool = kv[0].k if kv else None  # its bytes per key bound a bucket's gathered K/V
        num_rows = batch.tokens.shape[0]
        lengths = torch.cat([batch.self_kv.lengths, batch.cross_kv.lengths]).tolist()  # 1 read
        padding, min_padding = self.decode_bucket_padding, self.decode_bucket_min_padding
        self_buckets = padded_decode_buckets(
            batch.self_kv.read_slots, lengths[:num_rows], block_size, padding, min_padding, pool
        )
        self_meta = AttentionMetadata(
            write_slots=batch.self_kv.write_slots,
            write_rows=batch.self_kv.write_rows,
            buckets=self._with_position_bias(self_buckets, batch.positions, block_size, pool),
        )
        cross_buckets = padded_decode_buckets(
            batch.cross_kv.read_slots, lengths[num_rows:], block_size, padding, min_padding, pool
        )
        meta = T5DecoderMetadata(self_meta, AttentionMetadata(buckets=cross_buckets))
        hidden = self.run_decoder(batch.tokens, hidden, kv, meta)  # [B, 1, d_model]
        return self.logits(hidden[:, -1]) if self.has_head else hidden

    def _with_position_bias(
        self,
        buckets: tuple[DecodeBucket, ...],
        positions: Tensor,
        block_size: int,
        pool: Tensor | None,
    ) -> tuple[DecodeBucket, ...]:
        """Self-attention buckets whose mask is the additive causal position bias [b, H, 1, T]
        of their rows (query at `positions[b]`), with the keys past each row's length hidden:
        contiguous, in the dtype the attention over `pool` reads it in, so that every layer
        takes it as it is (paged_decode.bias_dtype)."""
        max_distance = self.config.relative_attention_max_distance
        table = self.position_tables.decoder_by_distance(
            max_distance, paged_decode.bias_dtype(pool)
        )
        with_bias = []
        for bucket in buckets:
            query_pos = positions[bucket.query_index][:, None]  # [b, 1]
            width = bucket.key_blocks.shape[1] * block_size
            key_pos = torch.arange(width, device=positions.device)[None]  # [1, T]
            rows = (query_pos - key_pos).clamp_(0, max_distance)  # [b, T]: the key's distance
            if bucket.mask is not None:
                rows.masked_fill_(~bucket.mask[:, 0, 0], max_distance + 1)  # the hidden row
            # An embedding lookup: a gather of whole rows, ~6x faster here than indexing.
            bias = F.embedding(rows, table).transpose(1, 2).contiguous()  # [b, H, T]
            with_bias.append(replace(bucket, mask=bias[:, :, None]))
        return tuple(with_bias)
