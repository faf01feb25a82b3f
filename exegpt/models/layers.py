"""Building blocks shared by the model families: norms, feed-forward nets, positions."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        # Accumulate in float32 so half-precision activations do not overflow.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class ReluFFN(nn.Module):
    """Original T5 feed-forward: wo(relu(wi x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.relu(self.wi(x)))


class GatedGeluFFN(nn.Module):
    """T5 v1.1 / Flan-T5 feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate x) * up x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
    """cos and sin tables [B, T, head_dim] for integer positions [B, T] (HF layout)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)  # [head_dim / 2]
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] by the tables [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]: broadcast over heads
    return x * cos + _rotate_half(x) * sin


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
