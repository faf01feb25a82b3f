"""A decode bucket's K/V gathered in parts that stay on the heap.

A decode bucket's keys are gathered into fresh K and V tensors of rows x padded keys x the
pool's bytes per key (exegpt/models/block_gather.py `gather_keys`). glibc serves a block over
its mmap threshold (32 MiB at most, pinned by exegpt/allocator.py) with a fresh mmap, and every
step then pays the page faults of touching it again: past that size a decode step of the
default model measured 1.78-1.85x its time per row below it (batch 320-512 at 128 cross keys,
float32), a cliff the profile cannot see (its grid stops at 2**15 KV tokens, below it) and that
a schedule with a large decode batch (RRA, static) walked into. Each bucket is therefore
attended in row slices whose gathered K (and V) stay within `DECODE_GATHER_MAX_BYTES`, cut once
per step when the step's layout is built (exegpt/models/decode_buckets.py), not per layer; each
extra slice costs one bucket's fixed kernel calls per layer, which a step of that size does not
notice. Only a CPU pool is sliced: the cliff is the host heap's, and a GPU gains nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor

from exegpt.allocator import MMAP_THRESHOLD_BYTES

if TYPE_CHECKING:
    from exegpt.models.decode_buckets import DecodeBucket

# Half the heap's ceiling: a copy of K/V the size of the gathered one (a cast to the queries'
# dtype, a grouped-query expansion in SDPA's math path) stays under it too.
DECODE_GATHER_MAX_BYTES = MMAP_THRESHOLD_BYTES // 2


def gathered_bytes(bucket: DecodeBucket, block_size: int, cache: Tensor) -> int:
    """Bytes of the K (or V) that gathering `bucket` from the pool `cache` allocates."""
    rows, blocks = bucket.key_blocks.shape
    return rows * blocks * block_size * cache[0].numel() * cache.element_size()


def within_budget(
    bucket: DecodeBucket, block_size: int, cache: Tensor, max_bytes: int = DECODE_GATHER_MAX_BYTES
) -> tuple[DecodeBucket, ...]:
    """`bucket` as consecutive row slices whose gathered K/V each fit `max_bytes` (one row
    at least), or itself when it fits whole or the pool is not in host memory."""
    rows, blocks = bucket.key_blocks.shape
    if cache.device.type != "cpu":
        return (bucket,)
    per_row = max(1, gathered_bytes(bucket, block_size, cache) // max(1, rows))
    per_slice = max(1, max_bytes // per_row)
    if rows <= per_slice:
        return (bucket,)
    width = blocks * block_size
    return tuple(
        _rows(bucket, start, min(start + per_slice, rows), width)
        for start in range(0, rows, per_slice)
    )


def _rows(bucket: DecodeBucket, start: int, end: int, width: int) -> DecodeBucket:
    """Rows start..end of `bucket`: its hidden keys (indices into the flattened rows x width)
    renumbered from the slice's first row; a mask broadcast over rows stays whole."""
    hidden = bucket.hidden_keys
    if hidden is not None:
        inside = (hidden >= start * width) & (hidden < end * width)
        hidden = hidden[inside] - start * width
    mask = bucket.mask
    if mask is not None and mask.shape[0] > 1:
        mask = mask[start:end]
    return replace(
        bucket,
        query_index=bucket.query_index[start:end],
        key_blocks=bucket.key_blocks[start:end],
        mask=mask,
        hidden_keys=hidden,
        key_ranges=None if bucket.key_ranges is None else bucket.key_ranges[start:end],
    )
