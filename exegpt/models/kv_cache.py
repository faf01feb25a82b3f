"""Paged KV cache: fixed-size blocks from a pool allocated up front, with exact byte accounting.

Slot `b * block_size_tokens + i` holds token i of block b. T5 keeps two kinds of blocks per
request in the same pool: self blocks (decoder self-attention K/V) and cross blocks (each
decoder layer's K/V of the encoder output, written once at prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from exegpt.models.attention import LayerKV
from exegpt.models.config import ModelConfig

DEFAULT_BLOCK_SIZE_TOKENS = 16  # tokens per KV block unless a worker is told otherwise


class KVCacheFull(RuntimeError):
    """The pool has fewer free blocks than a request needs."""


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int  # layers that keep KV (T5: decoder layers; Llama: all layers)
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> KVCacheSpec:
        return cls(config.num_kv_layers, config.num_kv_heads, config.head_dim, dtype)

    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        element_bytes = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_bytes

    def bytes_per_block(self, block_size_tokens: int) -> int:
        return self.bytes_per_token() * block_size_tokens


@dataclass
class SequenceKV:
    """One request's block tables; the runner fills them and advances the counts."""

    self_blocks: list[int] = field(default_factory=list)
    num_self_tokens: int = 0  # decoder tokens (Llama: prompt + generated) with K/V stored
    cross_blocks: list[int] = field(default_factory=list)
    num_cross_tokens: int = 0  # T5: encoder tokens whose cross K/V is stored


def blocks_for(num_tokens: int, block_size_tokens: int) -> int:
    return math.ceil(num_tokens / block_size_tokens)


def num_blocks_needed(
    config: ModelConfig, prompt_tokens: int, total_new_tokens: int, block_size_tokens: int
) -> int:
    """Most blocks (self + cross) a request can hold while it generates `total_new_tokens`.

    The K/V of the last generated token is never written (nothing attends to it), so a request
    stores prompt + new - 1 decoder tokens (Llama) or new decoder tokens, counting the start
    token (T5). Recompute after preemption needs no more than that.
    """
    new_tokens = max(total_new_tokens, 1)
    if config.is_encoder_decoder:
        cross = blocks_for(prompt_tokens, block_size_tokens)
        return cross + blocks_for(new_tokens, block_size_tokens)
    return blocks_for(prompt_tokens + new_tokens - 1, block_size_tokens)


class BlockAllocator:
    """Which of a pool's blocks are free. The engine's step scheduler owns one for its
    replica; the KV storage may live in this process or in pipeline stages, which all use
    the same block ids. Not thread-safe: one engine thread allocates and frees."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a KV pool needs num_blocks > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0 first
        self._allocated = [False] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks; all or nothing (raises KVCacheFull)."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            raise KVCacheFull(
                f"KV cache full: {num_blocks} blocks requested, {len(self._free)} of "
                f"{self.num_blocks} free"
            )
        block_ids = [self._free.pop() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._allocated[block_id] = True
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"duplicate block ids in {block_ids}")
        for block_id in block_ids:
            if not (0 <= block_id < self.num_blocks and self._allocated[block_id]):
                raise ValueError(f"block {block_id} is not allocated")
        for block_id in block_ids:
            self._allocated[block_id] = False
            self._free.append(block_id)

    def grow(
        self,
        seqs: list[SequenceKV],
        block_size_tokens: int,
        self_tokens: list[int],
        cross_tokens: list[int] | None,
    ) -> None:
        """Grow each sequence's block tables to hold the given token counts, all or nothing."""
        self_short = [
            max(0, blocks_for(n, block_size_tokens) - len(s.self_blocks))
            for s, n in zip(seqs, self_tokens, strict=True)
        ]
        cross_short = [0] * len(seqs)
        if cross_tokens is not None:
            cross_short = [
                max(0, blocks_for(n, block_size_tokens) - len(s.cross_blocks))
                for s, n in zip(seqs, cross_tokens, strict=True)
            ]
        needed = sum(self_short) + sum(cross_short)
        if needed > self.num_free_blocks:
            raise KVCacheFull(
                f"KV cache full: this step needs {needed} more blocks, "
                f"{self.num_free_blocks} of {self.num_blocks} free"
            )
        for seq, num_self, num_cross in zip(seqs, self_short, cross_short, strict=True):
            seq.self_blocks.extend(self.allocate(num_self))
            seq.cross_blocks.extend(self.allocate(num_cross))

    def release(self, seq: SequenceKV) -> None:
        """Return the sequence's blocks and reset it."""
        self.free(seq.self_blocks + seq.cross_blocks)
        seq.self_blocks, seq.cross_blocks = [], []
        seq.num_self_tokens = seq.num_cross_tokens = 0


class KVCachePool:
    """Per-layer K and V storage [num_blocks * block_size_tokens, num_kv_heads, head_dim],
    with its own block allocator for single-process use.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size_tokens <= 0:
            raise ValueError(
                f"a KV pool needs num_blocks > 0 and block_size_tokens > 0, got {num_blocks} "
                f"and {block_size_tokens}"
            )
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size_tokens = block_size_tokens
        self.device = torch.device(device)
        # One slot past the blocks stays zero: reads past a sequence's end go there, so stale
        # (even non-finite) K/V a freed block still holds never reaches another request.
        self.null_slot = num_blocks * block_size_tokens
        shape = (self.null_slot + 1, spec.num_kv_heads, spec.head_dim)
        # Zeros, not empty: padded reads hit unwritten slots and must never see NaN.
        self.layers: list[LayerKV] = [
            LayerKV(
                torch.zeros(shape, dtype=spec.dtype, device=self.device),
                torch.zeros(shape, dtype=spec.dtype, device=self.device),
                block_size_tokens,
            )
            for _ in range(spec.num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks)

    @classmethod
    def for_memory(
        cls,
        spec: KVCacheSpec,
        capacity_bytes: int,
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
        device: str | torch.device = "cpu",
    ) -> KVCachePool:
        """The largest pool whose storage fits in `capacity_bytes`."""
        bytes_per_block = spec.bytes_per_block(block_size_tokens)
        num_blocks = (capacity_bytes - spec.bytes_per_token()) // bytes_per_block  # + null slot
        if num_blocks < 1:
            raise ValueError(
                f"{capacity_bytes} bytes cannot hold one KV block of {bytes_per_block} bytes"
            )
        return cls(spec, num_blocks, block_size_tokens, device)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.spec.bytes_per_block(self.block_size_tokens)

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        return (self.num_blocks - self.num_free_blocks) * self.bytes_per_block

    def allocate(self, num_blocks: int) -> list[int]:
        return self.allocator.allocate(num_blocks)

    def free(self, block_ids: list[int]) -> None:
        self.allocator.free(block_ids)
