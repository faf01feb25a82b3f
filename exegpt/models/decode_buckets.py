"""Decode rows (one query token each) batched into buckets of similar KV length.

Rows are sorted by KV length and cut into buckets in which every row holds at least
`1 - DECODE_BUCKET_PADDING` of the bucket's longest, so a bucket's padded keys stay under a
third of its valid ones, or is at most DECODE_BUCKET_MIN_PADDING keys shorter (each bucket
costs a fixed ~100 us a layer), and each bucket is one kernel call. Their keys are gathered
whole KV blocks at a time (one `index_select` of contiguous blocks, not one of every slot), up
to the last block of the bucket's longest row. A bucket whose gathered K/V would pass
DECODE_GATHER_MAX_BYTES in host memory is cut into row slices (gather_budget.py) here, when
the step's layout is built, so every layer of the step reuses the slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from exegpt.models.block_gather import block_index, gather_keys
from exegpt.models.decode_attention import decode_kernel, matmul_attention_applies
from exegpt.models.gather_budget import DECODE_GATHER_MAX_BYTES, within_budget
from exegpt.models.paged_decode import paged_decode, reads_the_pool

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
    # [b, 2] int32: each row's visible keys, first and one past the last (its window, its
    # length), for a kernel that reads only those (paged_decode.py); None: every key.
    key_ranges: Tensor | None = None


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
    pool: Tensor | None = None,
) -> tuple[DecodeBucket, ...]:
    """Decode rows, longest KV first, cut where a row would pad past both bounds (a share
    `padding` of the bucket's longest, `min_padding` keys): row b's query is token
    `starts[b]`, its keys `read_slots[key_starts[b]:][:kv_lengths[b]]`. `min_padding` None:
    DECODE_BUCKET_MIN_PADDING. `pool` is a K pool of the step's layers (its bytes per key and
    device decide the row slices within the gather budget); None: buckets stay whole."""
    if min_padding is None:
        min_padding = DECODE_BUCKET_MIN_PADDING
    order = sorted(decodes, key=lambda b: kv_lengths[b], reverse=True)
    groups: list[list[int]] = []
    for b in order:
        if groups and _joins(kv_lengths[b], kv_lengths[groups[-1][0]], padding, min_padding):
            groups[-1].append(b)
        else:
            groups.append([b])
    buckets: list[DecodeBucket] = []
    for group in groups:
        bucket = _bucket(group, starts, kv_lengths, key_starts, read_slots, window, block_size)
        if pool is None:
            buckets.append(bucket)
        else:
            buckets.extend(within_budget(bucket, block_size, pool, DECODE_GATHER_MAX_BYTES))
    return tuple(buckets)


def _bucket(
    group: list[int],
    starts: list[int],
    kv_lengths: list[int],
    key_starts: list[int],
    read_slots: Tensor,
    window: int | None,
    block_size: int,
) -> DecodeBucket:
    """The rows `group` (longest first) padded to the first one's KV blocks."""
    device = read_slots.device
    num_blocks = -(-kv_lengths[group[0]] // block_size)
    columns = torch.arange(num_blocks * block_size)
    row_lengths = [kv_lengths[b] for b in group]
    lengths = torch.tensor(row_lengths)
    visible = columns[None] < lengths[:, None]  # [b, M * block_size]
    if window is not None:
        visible = visible & (columns[None] > lengths[:, None] - 1 - window)
    first_keys = lengths - window if window is not None else torch.zeros_like(lengths)
    key_ranges = torch.stack([first_keys.clamp(min=0), lengths], dim=1).to(torch.int32)
    mask = hidden_keys = None
    if not bool(visible.all()):
        mask = visible[:, None, None, :].to(device)
        hidden_keys = (~visible).flatten().nonzero().squeeze(1).to(device)
    return DecodeBucket(
        query_index=torch.tensor([starts[b] for b in group], device=device),
        key_blocks=block_index(
            read_slots, [key_starts[b] for b in group], row_lengths, num_blocks, block_size
        ),
        mask=mask,
        hidden_keys=hidden_keys,
        key_ranges=key_ranges,
    )


def _joins(length: int, longest: int, padding: float, min_padding: int) -> bool:
    """Whether a row of `length` keys joins a bucket whose longest row has `longest`."""
    return length >= (1 - padding) * longest or longest - length <= min_padding


def padded_decode_buckets(
    read_slots: Tensor,
    lengths: list[int],
    block_size: int,
    padding: float = DECODE_BUCKET_PADDING,
    min_padding: int | None = None,
    pool: Tensor | None = None,
) -> tuple[DecodeBucket, ...]:
    """Buckets of a padded decode step's rows (T5: one query token per row, row b reading the
    first `lengths[b]` of its slots `read_slots[b]` [B, T_kv]): no row reads keys past its
    bucket's longest, so padding costs what it costs a packed step. Row b's slots start at
    b x T_kv of the flattened tensor, and a bucket reads only a row's first `lengths[b]`.
    `pool` as decode_buckets'."""
    width = read_slots.shape[1]
    rows = list(range(len(lengths)))
    key_starts = [b * width for b in rows]
    flat = read_slots.reshape(-1)
    return decode_buckets(
        rows, rows, lengths, key_starts, flat, None, padding, block_size, min_padding, pool
    )


def attend_buckets(
    q: Tensor,
    out: Tensor,
    cache_k: Tensor | None,
    cache_v: Tensor | None,
    buckets: tuple[DecodeBucket, ...],
    block_size: int,
    scale: float,
) -> None:
    """Decode rows' attention: each bucket's queries (rows of q [N, H, D]) over their keys in
    a pool of `block_size`-token blocks, into `out`: read in place by the native kernel where
    it applies (paged_decode.py), otherwise gathered whole blocks at a time."""
    for bucket in buckets:
        assert cache_k is not None and cache_v is not None
        if bucket.key_ranges is not None and reads_the_pool(q, cache_k) and out.is_contiguous():
            bias = None if _is_bool(bucket.mask) else bucket.mask  # T5's position bias
            paged_decode(
                q, cache_k, cache_v, bucket.key_blocks, bucket.key_ranges, bias, block_size,
                scale, bucket.query_index, out,
            )  # fmt: skip
            continue
        queries = q[bucket.query_index]  # [b, H, D]
        # The matmul kernel overwrites a hidden key's score whatever it is (a NaN included)
        # when the mask is boolean: only the values need zeroing then.
        keep_keys = matmul_attention_applies(queries) and _is_bool(bucket.mask)
        keys, values = gather_keys(
            cache_k, cache_v, bucket.key_blocks, bucket.hidden_keys, block_size, not keep_keys
        )
        out[bucket.query_index] = decode_kernel(queries, keys, values, bucket.mask, scale)


def _is_bool(mask: Tensor | None) -> bool:
    return mask is None or mask.dtype == torch.bool
