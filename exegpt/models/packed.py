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
- decode rows (one query token) are batched: sorted by KV length and cut into buckets in which
  every row holds at least `1 - DECODE_BUCKET_PADDING` of the bucket's longest, so a bucket's
  padded keys stay under a third of its valid ones, or is at most DECODE_BUCKET_MIN_PADDING
  keys shorter (each bucket costs a fixed ~100 us a layer), and each bucket is one kernel
  call. Their keys are gathered whole KV blocks at a time (one `index_select` of contiguous
  blocks, not one of every slot), up to the last block of the bucket's longest row.

The layout is read from the batch's small index tensors once per step (one host read), then
every layer reuses it. T5 decode steps (padded index tensors, one query token per row) use the
same buckets: `padded_decode_buckets` cuts them from each row's slots and KV length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from exegpt.models.decode_attention import decode_kernel, matmul_attention_applies
from exegpt.models.gather_budget import DECODE_GATHER_MAX_BYTES, within_budget
from exegpt.models.prefill_attention import causal_prefill_attention, matmul_prefill_applies

# A decode row joins a bucket while its KV length is at least (1 - this) x the bucket's longest.
DECODE_BUCKET_PADDING = 0.25
# ... or while it is at most this many keys shorter: each bucket costs a dozen small kernel calls
# per layer whatever its size, so short rows share one (benchmarks/decode_buckets.py).
DECODE_BUCKET_MIN_PADDING = 128


@dataclass(frozen=True)
class DecodeBucket:
    """Decode rows attended together: their query tokens and their keys padded to the longest."""

    query_index: Tensor  # [b] token index (in the packed N) of each row's query
    key_blocks: Tensor  # [b, M] KV blocks of each row's keys (padding repeats its last block)
    mask: Tensor | None  # [b, 1, 1, M * block_size] True where the key is visible; None: all
    hidden_keys: Tensor | None  # [n] the hidden ones in the flattened [b * M * block_size]


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
) -> PackedLayout:
    """The layout of rows whose tokens are `query_starts[b]:query_starts[b + 1]`, starting at
    KV position `positions[b]`; `read_slots` (None: no row has cached K/V) are every row's
    valid key slots back to back, in a pool of `block_size`-token blocks."""
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


def decode_buckets(
    decodes: list[int],
    starts: list[int],
    kv_lengths: list[int],
    key_starts: list[int],
    read_slots: Tensor,
    window: int | None,
    padding: float,
    block_size: int,
    min_padding: int | None = None,
) -> tuple[DecodeBucket, ...]:
    """Decode rows, longest KV first, cut where a row would pad past both bounds (a share
    `padding` of the bucket's longest, `min_padding` keys): row b's query is token
    `starts[b]`, its keys `read_slots[key_starts[b]:][:kv_lengths[b]]`. `min_padding` None:
    DECODE_BUCKET_MIN_PADDING."""
    if min_padding is None:
        min_padding = DECODE_BUCKET_MIN_PADDING
    order = sorted(decodes, key=lambda b: kv_lengths[b], reverse=True)
    groups: list[list[int]] = []
    for b in order:
        if groups and _joins(kv_lengths[b], kv_lengths[groups[-1][0]], padding, min_padding):
            groups[-1].append(b)
        else:
            groups.append([b])
    device = read_slots.device
    buckets = []
    for group in groups:
        num_blocks = -(-kv_lengths[group[0]] // block_size)
        columns = torch.arange(num_blocks * block_size)
        row_lengths = [kv_lengths[b] for b in group]
        lengths = torch.tensor(row_lengths)
        visible = columns[None] < lengths[:, None]  # [b, M * block_size]
        if window is not None:
            visible = visible & (columns[None] > lengths[:, None] - 1 - window)
        mask = hidden_keys = None
        if not bool(visible.all()):
            mask = visible[:, None, None, :].to(device)
            hidden_keys = (~visible).flatten().nonzero().squeeze(1).to(device)
        buckets.append(
            DecodeBucket(
                query_index=torch.tensor([starts[b] for b in group], device=device),
                key_blocks=block_index(
                    read_slots, [key_starts[b] for b in group], row_lengths, num_blocks, block_size
                ),
                mask=mask,
                hidden_keys=hidden_keys,
            )
        )
    return tuple(buckets)


def _joins(length: int, longest: int, padding: float, min_padding: int) -> bool:
    """Whether a row of `length` keys joins a bucket whose longest row has `longest`."""
    return length >= (1 - padding) * longest or longest - length <= min_padding


def block_index(
    read_slots: Tensor,
    key_starts: list[int],
    lengths: list[int],
    num_blocks: int,
    block_size: int,
) -> Tensor:
    """The KV blocks [b, num_blocks] of rows whose keys are `read_slots[key_starts[b]:]
    [:lengths[b]]`: block j holds key j * block_size. A row of fewer blocks than num_blocks
    (a decode bucket's shorter rows) repeats its last block, whose columns the mask hides."""
    first_keys = torch.arange(0, num_blocks * block_size, block_size)[None]
    last_keys = torch.tensor(lengths)[:, None] - 1
    index = torch.tensor(key_starts)[:, None] + torch.minimum(first_keys, last_keys)
    return read_slots[index.to(read_slots.device)] // block_size


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


def attend_buckets(
    q: Tensor,
    out: Tensor,
    cache_k: Tensor | None,
    cache_v: Tensor | None,
    buckets: tuple[DecodeBucket, ...],
    block_size: int,
    scale: float,
) -> None:
    """Decode rows' attention: each bucket's queries (rows of q [N, H, D]) over their keys
    gathered whole blocks at a time from a pool of `block_size`-token blocks, into `out`; a
    bucket whose K/V would not fit DECODE_GATHER_MAX_BYTES runs in row slices
    (gather_budget.py)."""
    for whole in buckets:
        assert cache_k is not None and cache_v is not None
        for bucket in within_budget(whole, block_size, cache_k, DECODE_GATHER_MAX_BYTES):
            queries = q[bucket.query_index]  # [b, H, D]
            # The matmul kernel overwrites a hidden key's score whatever it is (a NaN
            # included) when the mask is boolean: only the values need zeroing then.
            keep_keys = matmul_attention_applies(queries) and _is_bool(bucket.mask)
            keys, values = gather_keys(
                cache_k, cache_v, bucket.key_blocks, bucket.hidden_keys, block_size, not keep_keys
            )
            out[bucket.query_index] = decode_kernel(queries, keys, values, bucket.mask, scale)


def padded_decode_buckets(
    read_slots: Tensor,
    lengths: list[int],
    block_size: int,
    padding: float = DECODE_BUCKET_PADDING,
    min_padding: int | None = None,
) -> tuple[DecodeBucket, ...]:
    """Buckets of a padded decode step's rows (T5: one query token per row, row b reading the
    first `lengths[b]` of its slots `read_slots[b]` [B, T_kv]): no row reads keys past its
    bucket's longest, so padding costs what it costs a packed step. Row b's slots start at
    b x T_kv of the flattened tensor, and a bucket reads only a row's first `lengths[b]`."""
    width = read_slots.shape[1]
    rows = list(range(len(lengths)))
    key_starts = [b * width for b in rows]
    flat = read_slots.reshape(-1)
    return decode_buckets(
        rows, rows, lengths, key_starts, flat, None, padding, block_size, min_padding
    )


def gather_keys(
    cache_k: Tensor,
    cache_v: Tensor,
    key_blocks: Tensor,
    hidden_keys: Tensor | None,
    block_size: int,
    zero_keys: bool = True,
) -> tuple[Tensor, Tensor]:
    """The K and V [b, M * block_size, H_kv, D] of blocks [b, M], with the `hidden_keys`
    (indices into the flattened b * M * block_size) zeroed: a masked column of a row's last
    block may hold stale K/V of a freed block's earlier owner, even non-finite, and a NaN
    times a zero weight is still NaN. Zeroed by a row index fill (a broadcast masked_fill of
    [b, T, 1, 1] ran 15x slower). `zero_keys=False` leaves the keys as gathered, for a kernel
    that replaces a hidden key's score outright."""
    keys = gather_blocks(cache_k, key_blocks, block_size)
    values = gather_blocks(cache_v, key_blocks, block_size)
    if hidden_keys is not None and zero_keys:
        keys.view(-1, *keys.shape[2:]).index_fill_(0, hidden_keys, 0)
    if hidden_keys is not None:
        values.view(-1, *values.shape[2:]).index_fill_(0, hidden_keys, 0)
    return keys, values


def _is_bool(mask: Tensor | None) -> bool:
    return mask is None or mask.dtype == torch.bool


def gather_blocks(cache: Tensor, blocks: Tensor, block_size: int) -> Tensor:
    """The K or V [b, M * block_size, H_kv, D] of blocks [b, M] of a pool [slots, H_kv, D] whose
    slot `i * block_size + j` is token j of block i (a trailing null slot is left out)."""
    num_blocks = cache.shape[0] // block_size
    paged = cache[: num_blocks * block_size].view(num_blocks, block_size, *cache.shape[1:])
    rows = paged.index_select(0, blocks.flatten())  # [b * M, block_size, H_kv, D]
    return rows.view(blocks.shape[0], -1, *cache.shape[1:])


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
