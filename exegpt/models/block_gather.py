"""Keys read from a paged KV pool whole blocks at a time: the block index of rows of keys, and
their K/V gathered with the stale tail of a row's last block zeroed."""

from __future__ import annotations

import torch
from torch import Tensor


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


def gather_blocks(cache: Tensor, blocks: Tensor, block_size: int) -> Tensor:
    """The K or V [b, M * block_size, H_kv, D] of blocks [b, M] of a pool [slots, H_kv, D] whose
    slot `i * block_size + j` is token j of block i (a trailing null slot is left out)."""
    num_blocks = cache.shape[0] // block_size
    paged = cache[: num_blocks * block_size].view(num_blocks, block_size, *cache.shape[1:])
    rows = paged.index_select(0, blocks.flatten())  # [b * M, block_size, H_kv, D]
    return rows.view(blocks.shape[0], -1, *cache.shape[1:])
