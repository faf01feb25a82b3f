"""Building blocks shared by the model families: norms, feed-forward nets, positions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exegpt.allocator import MMAP_THRESHOLD_BYTES
from exegpt.models.config import ModelConfig, RopeScaling


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An embedding table starting at zero: weights always come from a checkpoint or an
    explicit init, and nn.Embedding's own random init is slow to trace on the meta device."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.zeros(num_embeddings, dim))


class RMSNorm(nn.Module):
    """T5 LayerNorm / Llama RMSNorm: scale only, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalized in float32 so half-precision activations do not overflow, cast back, then
        # scaled, as transformers does: bit-identical to its op chain (x.float(), pow, mean,
        # add, rsqrt, mul, to) in 3 ops instead of 8. The weight goes outside: torch's fused
        # kernel given a bf16 weight ran 4x slower than this at 4096 tokens (torch 2.13, CPU).
        # Scaled in place (the same products as weight * normalized) where the dtypes agree:
        # one activation-sized allocation fewer (see the note above the feed-forwards).
        normalized = torch.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        if normalized.dtype != self.weight.dtype:
            return self.weight * normalized
        return normalized.mul_(self.weight)


# A feed-forward's widest intermediate ([tokens x d_ff], two of them gated) stays under this
# on a CPU: longer inputs run in token chunks (`in_token_chunks`). A chunk keeps at least
# FFN_CHUNK_MIN_TOKENS tokens, so that each GEMM keeps an M the matrix engine runs at its
# rate; a very wide d_ff (over 16k in float32) then passes the budget rather than shrink M.
FFN_CHUNK_MAX_BYTES = MMAP_THRESHOLD_BYTES // 2
FFN_CHUNK_MIN_TOKENS = 256


def ffn_chunk_tokens(width: int, element_size: int) -> int:
    """Tokens per chunk for an intermediate of `width` values a token of `element_size`
    bytes: within FFN_CHUNK_MAX_BYTES, or FFN_CHUNK_MIN_TOKENS where that is more."""
    return max(FFN_CHUNK_MIN_TOKENS, FFN_CHUNK_MAX_BYTES // (width * element_size))


def in_token_chunks(ffn: Callable[[Tensor], Tensor], x: Tensor, width: int) -> Tensor:
    """ffn(x) for x [..., d_model], over consecutive slices of its tokens of
    `ffn_chunk_tokens` each (on a CPU; elsewhere whole). A token's output depends on its own
    row only, so the slices give the same values; each slice's tensors stay under glibc's
    mmap threshold and reuse heap memory, where a whole prefill of thousands of tokens maps
    fresh pages for each and faults them in."""
    flat = x.reshape(-1, x.shape[-1])
    tokens = flat.shape[0]
    chunk = ffn_chunk_tokens(width, x.element_size())
    if x.device.type != "cpu" or tokens <= chunk:
        return ffn(x)
    parts = [ffn(flat[start : start + chunk]) for start in range(0, tokens, chunk)]
    return torch.cat(parts).view(*x.shape[:-1], parts[0].shape[-1])


# The feed-forwards apply their activation and gate in place on tensors of their own (the
# same values, bit for bit): each avoids one fresh [tokens x d_ff] tensor. A prefill step of
# thousands of tokens makes that tensor tens of MiB, past glibc's mmap threshold
# (exegpt/allocator.py), so every fresh one is a new mapping whose pages fault in on first
# touch: at 8192 tokens (bf16, d_ff 2048, one thread) silu(gate) * up took 34.1 ms and
# silu(gate).mul_(up) 18.8 ms; at 2048 tokens 3.94 and 3.60 ms (RMSNorm's scale in place:
# 8.16 and 7.52 ms at 8192 tokens).


class ReluFFN(nn.Module):
    """Original T5 feed-forward: wo(relu(wi x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return in_token_chunks(self._forward, x, self.wi.out_features)

    def _forward(self, x: Tensor) -> Tensor:
        return self.wo(F.relu(self.wi(x), inplace=True))  # wi's output is this call's own


class GatedGeluFFN(nn.Module):
    """T5 v1.1 / Flan-T5 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return in_token_chunks(self._forward, x, 2 * self.wi_0.out_features)

    def _forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh").mul_(self.wi_1(x)))


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate x) * up x). A serving model runs gate and up as one GEMM
    (`fuse`); a checkpoint always holds them apart."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by `fuse`

    def fuse(self) -> None:
        """Replace gate and up by one Linear of their stacked weights (serving only)."""
        self.gate_up_proj = concat_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        return in_token_chunks(self._forward, x, 2 * self.down_proj.in_features)

    def _forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)).mul_(self.up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose outputs are those of `linears` side by side (weights stacked by rows):
    one GEMM instead of several, each output column the same dot product as before."""
    first = linears[0]
    has_bias = first.bias is not None
    if any((linear.bias is not None) != has_bias for linear in linears):
        raise ValueError("cannot concatenate Linears with and without a bias")
    if any(linear.in_features != first.in_features for linear in linears):
        raise ValueError("concatenated Linears must share their input width")
    out_features = sum(linear.out_features for linear in linears)
    weight = first.weight
    fused = nn.Linear(
        first.in_features, out_features, bias=has_bias, device="meta", dtype=weight.dtype
    )
    fused.weight = nn.Parameter(
        torch.cat([linear.weight.detach() for linear in linears]), requires_grad=False
    )
    if has_bias:
        biases = [linear.bias.detach() for linear in linears if linear.bias is not None]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


def build_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "relu":
        return ReluFFN(config.d_model, config.d_ff)
    if config.ffn == "gated-gelu":
        return GatedGeluFFN(config.d_model, config.d_ff)
    return SwiGLU(config.d_model, config.d_ff)


# ---- rotary positions (Llama) --------------------------------------------------------------


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, device: Any = None
) -> Tensor:
    """Inverse frequencies [head_dim / 2], scaled as transformers scales them."""
    exponents = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim / 2]
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slow down by `factor`, short ones stay, the middle band blends.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables [B, T, 1, head_dim] for integer positions [B, T], built once
    per step for every layer. The sin table's first half is negated (`apply_rope`)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)  # [head_dim / 2]
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    cos = torch.cat((cos, cos), dim=-1)  # [B, T, head_dim]
    signed_sin = torch.cat((-sin, sin), dim=-1)  # negation is exact
    return cos[:, :, None], signed_sin[:, :, None]


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] by the tables [B, T, 1, D] of `rope_cos_sin`.

    transformers computes x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1);
    here (x2, x1) is one flip of the halves and the sign sits in the table: the same products
    and sum, bit for bit, in 4 kernels instead of 6 (the sign costs nothing per layer)."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (x2, x1)
    return (x * cos).add_(swapped * signed_sin)


# ---- relative position buckets (T5) --------------------------------------------------------


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Mesh-TensorFlow bucketing of (key position - query position), as in HF T5."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        # A causal decoder never looks ahead: only past distances get their own buckets.
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Half the buckets are exact; the rest grow logarithmically up to max_distance.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def causal_distance_bias(table: nn.Embedding, max_distance: int) -> Tensor:
    """A causal (decoder) stack's bias by distance: [max_distance + 1, H], row d for a key d
    positions before its query (d = 0 also for a key at or after it, as the bucketing has
    it). Every distance from `max_distance` on falls in the last bucket, so the bias of any
    query and key positions is this table read at (query - key) clamped to 0..max_distance."""
    distance = torch.arange(max_distance + 1, device=table.weight.device)
    return table(relative_position_bucket(-distance, False, table.num_embeddings, max_distance))


def relative_position_bias(
    table: nn.Embedding,
    query_positions: Tensor,
    key_positions: Tensor,
    bidirectional: bool,
    max_distance: int,
) -> Tensor:
    """Bias [B, H, Tq, Tk] from positions [B, Tq] and [B, Tk] (B may be 1)."""
    relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, Tq, Tk]
    buckets = relative_position_bucket(relative, bidirectional, table.num_embeddings, max_distance)
    return table(buckets).permute(0, 3, 1, 2)  # [B, Tq, Tk, H] -> [B, H, Tq, Tk]
