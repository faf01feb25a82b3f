"""Attention over a paged KV cache: metadata, cache write/gather, and the attention kernel.

A batch step writes the new tokens' K/V into pool slots and, where the sequences have history
(decode, T5 cross-attention), gathers each sequence's K/V through slot indices. T5 prefills are
padded: a [B, T_kv, H_kv, D] view with an additive length mask, and nothing here reads a value
back to the host. Decoder-only steps are packed (`meta.packed`, exegpt/models/packed.py) and
T5 decode steps bucketed (`meta.buckets`): each row attends over its own valid keys only (and
a bounded share of padding), cut by a layout read once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from exegpt.models.decode_attention import decode_kernel
from exegpt.models.decode_buckets import DecodeBucket, attend_buckets
from exegpt.models.packed import PackedLayout, packed_attention


@dataclass(frozen=True)
class LayerKV:
    """One layer's slice of the KV pool: flat slot-major storage, slot `i * block_size_tokens
    + j` holding token j of block i."""

    k: Tensor  # [num_slots, H_kv, D]
    v: Tensor  # [num_slots, H_kv, D]
    block_size_tokens: int = 1  # 1: scratch rows addressed slot by slot


@dataclass(frozen=True)
class AttentionMetadata:
    """What one attention call of a batch step needs; shared by every layer of a stack."""

    # [B, 1 | H, T_q, T_kv] additive: 0 or mask_value, plus T5 position bias; None when packed
    attn_bias: Tensor | None = None
    write_slots: Tensor | None = None  # [N] pool slots that receive the new K/V
    write_rows: Tensor | None = None  # [N] rows of the flattened [B * T_q] new K/V to store
    read_slots: Tensor | None = None  # [B, T_kv] slots to attend to; None: attend to new K/V
    rope: tuple[Tensor, Tensor] | None = None  # Llama cos, signed sin [B, T_q, 1, D]
    # A packed step (decoder-only): the new tokens are one row [1, N] and `read_slots` are
    # every row's valid key slots back to back; the layout says how attention is cut.
    packed: PackedLayout | None = None
    # A packed T5 encoder step: the prompts are one row [1, N], back to back with these lengths,
    # each attending to itself alone with `attn_bias` [1, H, S_max, S_max] cut to its length.
    row_lengths: tuple[int, ...] | None = None
    # A T5 decode step (one query token per row [B, 1]): each bucket of rows attends over its
    # own keys, gathered by blocks from the cache (a bucket's `mask` may be an additive bias).
    buckets: tuple[DecodeBucket, ...] | None = None


def mask_value(dtype: torch.dtype) -> float:
    # Finite, so rows stay NaN-free even when a bias is added to it.
    return torch.finfo(dtype).min


def attention_bias(
    query_positions: Tensor,
    kv_lengths: Tensor,
    num_kv: int,
    causal: bool,
    dtype: torch.dtype,
    window: int | None = None,
) -> Tensor:
    """Additive mask [B, 1, T_q, T_kv]: key j is visible if j < length (and j <= query pos;
    with a sliding `window`, also j > query pos - window, as Mistral)."""
    keys = torch.arange(num_kv, device=kv_lengths.device)
    visible = (keys[None, None, :] < kv_lengths[:, None, None]).expand(
        -1, query_positions.shape[-1], -1
    )  # [B, T_q, T_kv]
    if causal:
        visible = visible & (keys[None, None, :] <= query_positions[..., None])
    if window is not None:
        visible = visible & (keys[None, None, :] > query_positions[..., None] - window)
    bias = torch.zeros(visible.shape, dtype=dtype, device=kv_lengths.device)
    bias.masked_fill_(~visible, mask_value(dtype))
    return bias.unsqueeze(1)  # [B, 1, T_q, T_kv]


def write_kv(cache: LayerKV, k: Tensor, v: Tensor, meta: AttentionMetadata) -> None:
    """Store the new K/V [B, T, H_kv, D] of the rows named by the metadata into their slots."""
    if meta.write_slots is None:
        return
    rows_k = k.reshape(-1, *k.shape[2:])  # [B * T, H_kv, D]
    rows_v = v.reshape(-1, *v.shape[2:])
    if meta.write_rows is not None:
        rows_k, rows_v = rows_k[meta.write_rows], rows_v[meta.write_rows]  # [N, H_kv, D]
    cache.k.index_copy_(0, meta.write_slots, rows_k.to(cache.k.dtype))
    cache.v.index_copy_(0, meta.write_slots, rows_v.to(cache.v.dtype))


def gather_kv(cache: LayerKV, read_slots: Tensor) -> tuple[Tensor, Tensor]:
    """Padded per-sequence K/V [B, T_kv, H_kv, D] from slot indices [B, T_kv] (one
    `index_select` of the flat slots: 2x faster than advanced indexing on a CPU)."""
    flat = read_slots.flatten()
    shape = (*read_slots.shape, *cache.k.shape[1:])
    return cache.k.index_select(0, flat).view(shape), cache.v.index_select(0, flat).view(shape)


def attention_kernel(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v with grouped-query heads.

    q [B, T_q, H, D], k and v [B, T_kv, H_kv, D], bias broadcastable to [B, H, T_q, T_kv];
    returns [B, T_q, H, D]. One query token per row (the start token of a T5 prefill's decoder
    step; its decode steps go through buckets) goes to `decode_kernel`, which picks its path.
    """
    if q.shape[1] == 1:
        return decode_kernel(q[:, 0], k, v, bias[:, :, 0, None], scale)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # [B, H, T_q, D]
        k.transpose(1, 2),  # [B, H_kv, T_kv, D]
        v.transpose(1, 2),
        attn_mask=bias.to(q.dtype),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)  # [B, H, T_q, D] -> [B, T_q, H, D]


def packed_rows_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, row_lengths: tuple[int, ...], scale: float
) -> Tensor:
    """Bidirectional attention of packed rows q, k, v [1, N, H, D]: each row over its own
    tokens, with the bias [1 | B, H, S, S] cut to its length (rows of one length share a call).
    """
    out = torch.empty_like(q[0])  # [N, H, D]
    starts: dict[int, list[int]] = {}
    offset = 0
    for length in row_lengths:
        starts.setdefault(length, []).append(offset)
        offset += length
    for length, row_starts in starts.items():
        index = torch.tensor(row_starts, device=q.device)[:, None] + torch.arange(
            length, device=q.device
        )  # [b, n] token indexes of the rows of this length
        cut = bias[:1, :, :length, :length]
        out[index] = attention_kernel(q[0][index], k[0][index], v[0][index], cut, scale)
    return out[None]


def paged_attention(
    q: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache: LayerKV | None,
    meta: AttentionMetadata,
    scale: float,
) -> Tensor:
    """Write the new K/V (if any) to the cache, then attend over what the metadata names.

    With `meta.read_slots` the keys come from the cache (decode, cross-attention); without, they
    are the new K/V themselves (prefill, encoder). Returns [B, T_q, H, D].
    """
    if cache is not None and k is not None and v is not None:
        write_kv(cache, k, v, meta)
    if meta.packed is not None:
        if k is None or v is None:
            raise ValueError("a packed step attends over its new K/V and the cache")
        cache_k, cache_v = (cache.k, cache.v) if cache is not None else (None, None)
        return packed_attention(q, k, v, cache_k, cache_v, meta.packed, scale)
    if meta.buckets is not None:
        if cache is None:
            raise ValueError("decode buckets given but no KV cache")
        out = torch.empty_like(q[:, 0])  # [B, H, D]
        block_size = cache.block_size_tokens
        attend_buckets(q[:, 0], out, cache.k, cache.v, meta.buckets, block_size, scale)
        return out[:, None]
    if meta.read_slots is not None:
        if cache is None:
            raise ValueError("read_slots given but no KV cache")
        k, v = gather_kv(cache, meta.read_slots)
    if k is None or v is None or meta.attn_bias is None:
        raise ValueError("no keys to attend to: pass new K/V or read_slots, and a bias")
    return attention_kernel(q, k.to(q.dtype), v.to(q.dtype), meta.attn_bias, scale)
