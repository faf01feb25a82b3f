"""Packed variable-length steps (decoder-only models): every row's new tokens flattened into one
sequence of N tokens with per-row offsets (cu_seqlens), so the projections and feed-forward
never compute on padding.

A row is a prefill (its keys are its own new tokens), a chunk of a prefill (it also attends to
the K/V its earlier chunks cached) or a decode (one new token over its cached K/V); one step may
mix them. Attention runs per kind of row, over valid keys only:

- rows with several query tokens get one `scaled_dot_product_attention` call per group of
  rows of the same shape (new tokens, start, keys), over their keys (causal, aligned to each
  row's last key): one call per row in a skewed batch, one for a batch of equal prompts. On
  this project's CPU that beats one call over a block-diagonal mask of all N tokens, which
  does work on every pair of rows (benchmarks/packed_prefill.py measures both). A fresh
  prefill's keys are its new K/V (in bf16/fp16 on a CPU it takes prefill_attention.py's
  blocked matmuls instead of SDPA); a chunk's (its cached prefix and itself) are gathered whole
  KV blocks at a time, the tail of its last block masked and zeroed;
- decode rows (one query token) are batched into buckets of similar KV length, each one
  kernel call (decode_buckets.py).

The layout is read from the batch's small index tensors once per step (one host read), then
every layer reuses it. T5 decode steps (padded index tensors, one query token per row) use the
same buckets: `padded_decode_buckets` cuts them from each row's slots and KV length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from exegpt.models.block_gather import block_index, gather_keys
from exegpt.models.decode_buckets import (
    DECODE_BUCKET_PADDING,
    DecodeBucket,
    attend_buckets,
    decode_buckets,
)
from exegpt.models.prefill_attention import causal_prefill_attention, matmul_prefill_applies


@dataclass(frozen=True)
class RowGroup:
    """Rows with several query tokens and the same shape: one kernel call over their keys."""

    query_index: Tensor  # [b, T_q] their tokens in the packed N
    # [b, M] KV blocks of their keys (chunks: the cached prefix and their own); None: a fresh
    # prefill, whose keys are its new K/V alone
    key_blocks: Tensor | None
    mask: Tensor | None  # [T_q, T_kv] True where visible; None: plain causal
    hidden_keys: Tensor | None = None  # [n] padding keys in the flattened [b * M * block_size]


@dataclass(frozen=True)
class PackedLayout:
    """How a packed step's attention is cut, built once per step for every layer."""

    num_tokens: int
    block_size: int  # tokens per KV block of the pool the step reads
    groups: tuple[RowGroup, ...]
    buckets: tuple[DecodeBucket, ...]
    token_positions: Tensor  # [N] absolute position of each new token
    last_tokens: Tensor  # [B] index of each row's last new token (where its logits are)


def packed_layout(
    query_starts: Tensor,
    positions: Tensor,
    read_slots: Tensor | None,
    window: int | None,
    padding: float = DECODE_BUCKET_PADDING,
    block_size: int = 1,
    min_padding: int | None = None,
    pool: Tensor | None = None,
) -> PackedLayout:
    """The layout of rows whose tokens are `query_starts[b]:query_starts[b + 1]`, starting at
    KV position `positions[b]`; `read_slots` (None: no row has cached K/V) are every row's
    valid key slots back to back, in a pool of `block_size`-token blocks. `pool`, a K pool of
    the step's layers, cuts decode buckets past the gather budget into row slices
    (decode_buckets.py); None: they stay whole."""
    device = query_starts.device
    starts = query_starts.tolist()
    first_positions = positions.tolist()
    num_new = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    kv_lengths = [p + n for p, n in zip(first_positions, num_new, strict=True)]
    key_starts = [0]
    for length in kv_lengths:
        key_starts.append(key_starts[-1] + length)
    shapes: dict[tuple[int, int], list[int]] = {}  # (start, new tokens) -> rows
    decodes: list[int] = []
    for b, count in enumerate(num_new):
        if count == 1 and read_slots is not None:
            decodes.append(b)
        else:
            shapes.setdefault((first_positions[b], count), []).append(b)
    groups = []
    for (first, count), rows in shapes.items():
        query_index = torch.tensor([starts[b] for b in rows])[:, None] + torch.arange(count)
        if first == 0 or read_slots is None:  # a whole prefill: its keys are its new K/V
            mask = _row_mask(first, count, first + count, window, device)
            groups.append(RowGroup(query_index.to(device), None, mask))
            continue
        row_starts = [key_starts[b] for b in rows]
        groups.append(
            chunk_group(
                query_index.to(device), row_starts, first, count, read_slots, window, block_size
            )
        )
    buckets: tuple[DecodeBucket, ...] = ()
    if decodes:
        assert read_slots is not None
        buckets = decode_buckets(
            decodes,
            starts,
            kv_lengths,
            key_starts,
            read_slots,
            window,
            padding,
            block_size,
            min_padding,
            pool,
        )
    token_positions = torch.cat(
        [torch.arange(p, p + n) for p, n in zip(first_positions, num_new, strict=True)]
    )
    return PackedLayout(
        num_tokens=starts[-1],
        block_size=block_size,
        groups=tuple(groups),
        buckets=buckets,
        token_positions=token_positions.to(device),
        last_tokens=query_starts[1:] - 1,
    )


def chunk_group(
    query_index: Tensor,
    row_starts: list[int],
    first: int,
    count: int,
    read_slots: Tensor,
    window: int | None,
    block_size: int,
) -> RowGroup:
    """Chunk rows continuing their prefills at `first` with `count` tokens each: their keys
    (row b's are `read_slots[row_starts[b]:][:first + count]`) are read whole KV blocks at a
    time, one `index_select` of contiguous blocks (not one of every slot: 3-4x faster on a
    CPU), and the columns past a row's last key are masked and zeroed."""
    num_keys = first + count
    num_blocks = -(-num_keys // block_size)
    lengths = [num_keys] * len(row_starts)
    key_blocks = block_index(read_slots, row_starts, lengths, num_blocks, block_size)
    width = num_blocks * block_size
    mask = _row_mask(first, count, num_keys, window, query_index.device, width)
    hidden_keys = None
    if width > num_keys:  # the last block's unwritten tail may hold a freed block's old K/V
        columns = torch.arange(num_keys, width)
        rows = torch.arange(len(row_starts))[:, None] * width
        hidden_keys = (rows + columns[None]).flatten().to(query_index.device)
    return RowGroup(query_index, key_blocks, mask, hidden_keys)


def _row_mask(
    first: int,
    num_queries: int,
    num_keys: int,
    window: int | None,
    device: torch.device,
    width: int | None = None,
) -> Tensor | None:
    """Visibility [T_q, width] (width: num_keys unless padded) of a row whose queries sit at
    first .. first + T_q - 1; None when it is the plain causal mask of a fresh prefill (the
    kernel's own). Padding columns (past num_keys) are hidden."""
    width = num_keys if width is None else width
    if first == 0 and window is None and width == num_keys:
        return None
    query_pos = torch.arange(first, first + num_queries, device=device)[:, None]
    keys = torch.arange(width, device=device)[None]
    visible = (keys <= query_pos) & (keys < num_keys)
    if window is not None:
        visible = visible & (keys > query_pos - window)
    return visible


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor | None,
    cache_v: Tensor | None,
    layout: PackedLayout,
    scale: float,
) -> Tensor:
    """Attention of packed queries q [1, N, H, D]; new K/V [1, N, H_kv, D] (already written to
    the cache when there is one). Returns [1, N, H, D]."""
    q, k, v = q[0], k[0], v[0]  # [N, H, D], [N, H_kv, D]
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for group in layout.groups:
        if group.key_blocks is None:
            keys, values = k[group.query_index], v[group.query_index]  # [b, T, H_kv, D]
        else:
            assert cache_k is not None and cache_v is not None
            keys, values = gather_keys(
                cache_k, cache_v, group.key_blocks, group.hidden_keys, layout.block_size
            )
        queries = q[group.query_index]  # [b, T_q, H, D]
        out[group.query_index] = _kernel(queries, keys, values, group.mask, scale, gqa)
    attend_buckets(q, out, cache_k, cache_v, layout.buckets, layout.block_size, scale)
    return out[None]


def _kernel(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, gqa: bool
) -> Tensor:
    """SDPA over [B, T, H, D] layouts; no mask means causal for a square row, or all keys.
    Fresh prompts in bf16/fp16 on a CPU take the blocked matmul path (prefill_attention.py)."""
    causal = mask is None and q.shape[1] > 1
    if causal and q.shape[1] == k.shape[1] and matmul_prefill_applies(q, k.shape[2]):
        return causal_prefill_attention(q, k.to(q.dtype), v.to(q.dtype), scale)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.to(q.dtype).transpose(1, 2),
        v.to(q.dtype).transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)
