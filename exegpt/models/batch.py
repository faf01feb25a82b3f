"""Per-step batch descriptions the runner hands to a model: token ids and KV slot indices.

These hold only integers (no weights): the runner builds them once per step from the
sequences' block tables, and each model turns them into attention metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from exegpt.models.attention import LayerKV
from exegpt.models.config import ModelConfig


@dataclass(frozen=True)
class KVIndex:
    """Where one kind of KV (self or T5 cross) of a batch lives in the pool."""

    lengths: Tensor  # [B] KV tokens of each sequence once this step has written
    write_slots: Tensor | None  # [N] pool slots receiving this step's new K/V
    write_rows: Tensor | None  # [N] rows of the flattened [B * T_new] tokens that are written
    read_slots: Tensor | None  # [B, T_kv] slot of every KV position (padding -> any valid slot)


@dataclass(frozen=True)
class PrefillBatch:
    tokens: Tensor  # [B, T] right-padded; Llama: prompt + prefix, T5: [start] + prefix
    lengths: Tensor  # [B] valid tokens per row
    self_kv: KVIndex  # writes the K/V of valid tokens; no reads
    encoder_tokens: Tensor | None = None  # [B, S] right-padded prompts (T5)
    encoder_lengths: Tensor | None = None  # [B]
    cross_kv: KVIndex | None = None  # T5: writes encoder K/V, reads it back for the decoder


@dataclass(frozen=True)
class DecodeBatch:
    tokens: Tensor  # [B, 1] the last token of each sequence
    positions: Tensor  # [B] its position, i.e. the KV length before this step
    self_kv: KVIndex  # writes one token per sequence, reads [B, T_kv]
    cross_kv: KVIndex | None = None  # T5: reads the encoder K/V


class ServingModel(Protocol):
    """What the runner needs from a model family."""

    config: ModelConfig
    embed: nn.Embedding
    decoder_layers: nn.ModuleList
    lm_head: nn.Linear

    def prefill(self, batch: PrefillBatch, kv: Sequence[LayerKV]) -> Tensor:
        """Logits [B, vocab] at each row's last valid position."""
        ...

    def decode(self, batch: DecodeBatch, kv: Sequence[LayerKV]) -> Tensor:
        """Logits [B, vocab] for the next token of each sequence."""
        ...
