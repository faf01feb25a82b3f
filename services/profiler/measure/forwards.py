"""Whole-model forwards on the real model, as `exegpt profile --validate` times them.

A `ForwardPoint` is one prefill or one decode step of a batch; `WholeForwards` runs the
engine's ModelRunner on the real model over a KV pool sized for its points (every page
holding data, as in a serving engine) and times them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import (
    DEFAULT_BLOCK_SIZE_TOKENS,
    KVCachePool,
    KVCacheSpec,
    blocks_for,
)
from exegpt.models.loader import LoadedModel
from exegpt.models.runner import ModelRunner
from services.profiler.measure.probe import Steps
from services.profiler.measure.timing import Timer, TimingStats


@dataclass(frozen=True)
class ForwardPoint:
    kind: Literal["prefill", "decode"]
    batch_size: int
    prompt_tokens: int
    kv_len_tokens: int = 0  # decode: tokens cached before the step; prefill: 0

    def fits(self, config: ModelConfig) -> bool:
        longest = self.prompt_tokens
        if self.kind == "decode":  # the step adds one token to the cache
            longest = max(longest, self.kv_len_tokens + 1)
        return longest <= config.max_context_tokens

    def num_blocks(self, block_size_tokens: int, is_encoder_decoder: bool) -> int:
        """KV blocks the step holds at once: its self-attention cache and, for an
        encoder-decoder, the encoder's cross K/V (a prefill's decoder starts with one token)."""
        size = block_size_tokens
        if self.kind == "prefill":
            per_seq = blocks_for(self.prompt_tokens, size) + (1 if is_encoder_decoder else 0)
        else:
            per_seq = blocks_for(self.kv_len_tokens + 1, size)
            if is_encoder_decoder:
                per_seq += blocks_for(self.prompt_tokens, size)
        return self.batch_size * per_seq


def blocks_for_points(
    points: Iterable[ForwardPoint], block_size_tokens: int, is_encoder_decoder: bool
) -> int:
    """Blocks a KV pool needs to run the largest of the steps."""
    return max([1, *(p.num_blocks(block_size_tokens, is_encoder_decoder) for p in points)])


def prefill(batch_size: int, prompt_tokens: int) -> ForwardPoint:
    return ForwardPoint("prefill", batch_size, prompt_tokens)


def decode(batch_size: int, prompt_tokens: int, kv_len_tokens: int) -> ForwardPoint:
    return ForwardPoint("decode", batch_size, prompt_tokens, kv_len_tokens)


class WholeForwards:
    """Times whole prefills and decode steps of the real model (unsharded, TP 1).

    The KV pool holds what the largest point needs, or with `max_kv_bytes` the largest
    point within that budget; `covers` tells which points it can run.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        points: Iterable[ForwardPoint],
        max_kv_bytes: int | None = None,
    ) -> None:
        self.config = loaded.config
        spec = KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype)
        if max_kv_bytes is not None:
            max_blocks = max_kv_bytes // (spec.bytes_per_token() * DEFAULT_BLOCK_SIZE_TOKENS)
            points = [p for p in points if self._blocks(p) <= max_blocks]
        num_blocks = blocks_for_points(
            points, DEFAULT_BLOCK_SIZE_TOKENS, loaded.config.is_encoder_decoder
        )
        self.pool = KVCachePool(spec, num_blocks, DEFAULT_BLOCK_SIZE_TOKENS, loaded.device)
        for layer in self.pool.layers:  # as in a serving engine, every page holds data
            layer.k.fill_(0.5)
            layer.v.fill_(0.5)
        self.steps = Steps(ModelRunner(loaded.model, self.pool), loaded.config)

    def _blocks(self, point: ForwardPoint) -> int:
        return point.num_blocks(DEFAULT_BLOCK_SIZE_TOKENS, self.config.is_encoder_decoder)

    def covers(self, point: ForwardPoint) -> bool:
        """Whether the pool holds the point's K/V."""
        return self._blocks(point) <= self.pool.num_blocks

    def usable(self, points: Iterable[ForwardPoint]) -> tuple[ForwardPoint, ...]:
        """The points that fit the model's context."""
        return tuple(p for p in points if p.fits(self.config))

    def measure(self, timer: Timer, point: ForwardPoint) -> TimingStats:
        if point.kind == "prefill":
            return timer.measure(self.steps.prefill_step(point.batch_size, point.prompt_tokens))
        cross = point.prompt_tokens if self.config.is_encoder_decoder else 0
        seqs = self.steps.decode_sequences(point.batch_size, point.kv_len_tokens, cross)
        try:
            return timer.measure(self.steps.decode_step(seqs))
        finally:
            self.steps.release(seqs)
