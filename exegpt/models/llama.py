"""Llama-style decoder-only model (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exegpt.models.attention import AttentionMetadata, LayerKV, paged_attention
from exegpt.models.batch import PackedBatch
from exegpt.models.config import ModelConfig
from exegpt.models.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    concat_linears,
    embedding,
    rope_cos_sin,
)
from exegpt.models.packed import packed_layout


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        bias = config.qkv_bias  # Qwen2
        self.q_proj = nn.Linear(config.d_model, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.d_model, bias=False)
        # A serving model projects q, k, v in one GEMM (`fuse`); its split, in heads:
        self.qkv_proj: nn.Linear | None = None
        self.qkv_heads: tuple[int, int] = (0, 0)  # (query heads, KV heads) of this shard

    def fuse(self) -> None:
        """Replace q, k and v by one Linear of their stacked weights (serving only: after any
        tensor-parallel slicing, so the head counts are read from this shard's Linears)."""
        head_dim = self.head_dim
        self.qkv_heads = (
            self.q_proj.out_features // head_dim,
            self.k_proj.out_features // head_dim,
        )
        self.qkv_proj = concat_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        batch, num_tokens = x.shape[:2]
        cos, sin = rope
        if self.qkv_proj is not None:  # fused: q and k rotate together, in one pass
            heads, kv_heads = self.qkv_heads
            qkv = self.qkv_proj(x).view(batch, num_tokens, heads + 2 * kv_heads, self.head_dim)
            qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)
            return qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]
        q = self.q_proj(x).view(batch, num_tokens, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, attn: Tensor) -> Tensor:
        return self.o_proj(attn.flatten(2))  # [B, T, H, D] -> [B, T, H*D] -> [B, T, d_model]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)

    def qkv(self, x: Tensor, meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor]:
        if meta.rope is None:
            raise ValueError("Llama attention needs rotary tables in the metadata")
        return self.self_attn.project_qkv(self.attn_norm(x), meta.rope)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV, meta: AttentionMetadata
    ) -> Tensor:
        return paged_attention(q, k, v, kv, meta, self.self_attn.scale)

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        x = x + self.self_attn.project_out(attn)
        return x + self.mlp(self.ffn_norm(x))

    def forward(self, x: Tensor, kv: LayerKV, meta: AttentionMetadata) -> Tensor:
        q, k, v = self.qkv(x, meta)
        return self.finish(x, self.attend(q, k, v, kv, meta))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "llama":
            raise ValueError(f"LlamaModel needs a llama config, got {config.family!r}")
        self.config = config
        self.embed = embedding(config.vocab_size, config.d_model)
        self.encoder_layers = nn.ModuleList()  # decoder-only: prefill runs the decoder layers
        self.decoder_layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_decoder_layers)
        )
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # False on a pipeline stage without the last layer: it returns hidden states.
        self.has_head = True
        self.tie_weights()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The weights' dtype (a pipeline stage may hold no embedding: any parameter tells)."""
        return next(self.parameters()).dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, signed sin [B, T, 1, D] for positions [B, T]; once per step for all layers."""
        config = self.config
        return rope_cos_sin(
            positions, config.head_dim, config.rope_theta, self.compute_dtype, config.rope_scaling
        )

    def run_layers(
        self, tokens: Tensor, hidden: Tensor | None, kv: Sequence[LayerKV], meta: AttentionMetadata
    ) -> Tensor:
        """This model's layers over `hidden` (a later stage) or the embedded tokens (the first)."""
        x = self.embed(tokens) if hidden is None else hidden
        for layer, layer_kv in zip(self.decoder_layers, kv, strict=True):
            x = layer(x, layer_kv, meta)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.final_norm(hidden)).float()

    def prefill(
        self, batch: PackedBatch, kv: Sequence[LayerKV], hidden: Tensor | None = None
    ) -> Tensor:
        """Logits [B, vocab] at each row's last new token; a stage without the head returns its
        hidden states [1, N, d_model] instead. Prefills, chunks and decodes all run packed."""
        return self.step(batch, kv, hidden)

    def decode(
        self, batch: PackedBatch, kv: Sequence[LayerKV], hidden: Tensor | None = None
    ) -> Tensor:
        return self.step(batch, kv, hidden)

    def step(self, batch: PackedBatch, kv: Sequence[LayerKV], hidden: Tensor | None) -> Tensor:
        """One packed step: the new tokens run as one row [1, N] through every layer, each
        row attending to its own cached and new keys only (exegpt/models/packed.py)."""
        if not isinstance(batch, PackedBatch):
            raise ValueError(f"a Llama step takes a packed batch, got {type(batch).__name__}")
        self_kv = batch.self_kv
        layout = packed_layout(
            batch.query_starts,
            batch.positions,
            self_kv.read_slots,
            self.config.sliding_window,
            block_size=kv[0].block_size_tokens if kv else 1,
            pool=kv[0].k if kv else None,
        )
        meta = AttentionMetadata(
            write_slots=self_kv.write_slots,
            write_rows=self_kv.write_rows,
            read_slots=self_kv.read_slots,
            rope=self.rope(layout.token_positions[None]),  # [1, N, D]
            packed=layout,
        )
        hidden = self.run_layers(batch.tokens[None], hidden, kv, meta)  # [1, N, d_model]
        if not self.has_head:
            return hidden
        return self.logits(hidden[0, layout.last_tokens])  # each row's last new token
