"""Per-step batch descriptions the runner hands to a model: token ids and KV slot indices.

These hold only integers (no weights): the runner builds them once per step from the
sequences' block tables, and each model turns them into attention metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from exegpt.models.attention import LayerKV
from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import SequenceKV


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
    tokens: Tensor  # [B, T] the last token of each sequence (T = 1), or a prefill chunk
    positions: Tensor  # [B] position of tokens[:, 0], i.e. the KV length before this step
    self_kv: KVIndex  # writes the new tokens of each sequence, reads [B, T_kv]
    cross_kv: KVIndex | None = None  # T5: reads the encoder K/V
    # A chunk of a decoder-only prefill: valid new tokens per row (right-padded), logits at
    # each row's last one; None: one token per row (a decode step).
    num_new: Tensor | None = None  # [B]


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


class BatchBuilder:
    """Builds a step's index tensors from the sequences' block tables (which must already
    hold every block the step writes). Index math runs on the host, then moves once."""

    def __init__(
        self, config: ModelConfig, block_size_tokens: int, null_slot: int, device: torch.device
    ) -> None:
        self.config = config
        self.block_size_tokens = block_size_tokens
        self.null_slot = null_slot  # an always-zero slot that reads past a sequence's end hit
        self.device = device

    def prefill(
        self, seqs: Sequence[SequenceKV], prompts: list[list[int]], prefixes: list[list[int]]
    ) -> PrefillBatch:
        """The prefill of fresh sequences; `prefixes` are tokens already generated (recompute)."""
        self_lengths, cross_lengths = prefill_lengths(self.config, prompts, prefixes)
        if self.config.is_encoder_decoder:
            start = self.config.decoder_start_token_id or 0
            decoder_inputs = [[start, *prefix] for prefix in prefixes]
        else:
            decoder_inputs = [[*p, *prefix] for p, prefix in zip(prompts, prefixes, strict=True)]
        zeros = [0] * len(seqs)
        encoder_tokens = encoder_lengths = cross_kv = None
        if cross_lengths is not None:
            encoder_tokens = self._padded(prompts)
            encoder_lengths = self._tensor(cross_lengths)
            cross_blocks = [s.cross_blocks for s in seqs]
            cross_kv = self._kv_index(cross_blocks, zeros, cross_lengths, max(cross_lengths))
        return PrefillBatch(
            tokens=self._padded(decoder_inputs),
            lengths=self._tensor(self_lengths),
            self_kv=self._kv_index([s.self_blocks for s in seqs], zeros, self_lengths, None),
            encoder_tokens=encoder_tokens,
            encoder_lengths=encoder_lengths,
            cross_kv=cross_kv,
        )

    def decode(self, seqs: Sequence[SequenceKV], last_token_ids: list[int]) -> DecodeBatch:
        """One decode step of prefilled sequences, appending `last_token_ids`."""
        positions = [seq.num_self_tokens for seq in seqs]
        self_kv = self._kv_index(
            [s.self_blocks for s in seqs], positions, [1] * len(seqs), max(positions) + 1
        )
        cross_kv = None
        if self.config.is_encoder_decoder:
            cross_lengths = [seq.num_cross_tokens for seq in seqs]
            cross_kv = self._read_index([s.cross_blocks for s in seqs], cross_lengths)
        return DecodeBatch(
            tokens=self._tensor(last_token_ids)[:, None],  # [B] -> [B, 1]
            positions=self._tensor(positions),
            self_kv=self_kv,
            cross_kv=cross_kv,
        )

    def chunk(
        self, seqs: Sequence[SequenceKV], chunks: list[list[int]], starts: list[int]
    ) -> DecodeBatch:
        """Prefill chunks of decoder-only sequences: `chunks[b]` from position `starts[b]`,
        attending causally to the K/V of the earlier chunks already in the cache."""
        if self.config.is_encoder_decoder:
            raise ValueError("an encoder-decoder prompt is not chunked (its encoder sees it all)")
        num_new = [len(chunk) for chunk in chunks]
        num_read = max(s + n for s, n in zip(starts, num_new, strict=True))
        self_kv = self._kv_index([s.self_blocks for s in seqs], starts, num_new, num_read)
        return DecodeBatch(
            tokens=self._padded(chunks),  # [B, T_max]
            positions=self._tensor(starts),
            self_kv=self_kv,
            num_new=self._tensor(num_new),
        )

    def _tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _padded(self, token_lists: list[list[int]]) -> Tensor:
        """Right-padded [B, T_max] token ids."""
        pad = self.config.pad_token_id or 0
        width = max(len(tokens) for tokens in token_lists)
        rows = [tokens + [pad] * (width - len(tokens)) for tokens in token_lists]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _on_device(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)

    def _slots(self, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Pool slots of token positions [B, T] given block tables [B, M] (on the host)."""
        block_size = self.block_size_tokens
        block_index = np.minimum(positions // block_size, table.shape[1] - 1)
        return np.take_along_axis(table, block_index, 1) * block_size + positions % block_size

    def _kv_index(
        self,
        block_lists: list[list[int]],
        starts: list[int],
        num_new: list[int],
        num_read: int | None,
    ) -> KVIndex:
        """Writes of `num_new[b]` tokens from position `starts[b]`, plus reads of `num_read`.

        The index math is numpy on the host: a step's few dozen small operations cost a
        fraction of what as many torch calls do, and only the results become tensors.
        """
        table = _block_table(block_lists)
        starts_a = np.asarray(starts, dtype=np.int64)
        num_new_a = np.asarray(num_new, dtype=np.int64)
        columns = np.arange(max(num_new))
        positions = starts_a[:, None] + columns[None]  # [B, T_new]
        write_rows = np.flatnonzero(columns[None] < num_new_a[:, None])  # [N]
        write_slots = self._slots(table, positions).ravel()[write_rows]  # [N]
        lengths = starts_a + num_new_a
        read_slots = None
        if num_read is not None:
            read_slots = self._on_device(self._read_slots(table, num_read, lengths))
        return KVIndex(
            lengths=self._on_device(lengths),
            write_slots=self._on_device(write_slots),
            write_rows=self._on_device(write_rows),
            read_slots=read_slots,
        )

    def _read_index(self, block_lists: list[list[int]], lengths: list[int]) -> KVIndex:
        table = _block_table(block_lists)
        lengths_a = np.asarray(lengths, dtype=np.int64)
        return KVIndex(
            lengths=self._on_device(lengths_a),
            write_slots=None,
            write_rows=None,
            read_slots=self._on_device(self._read_slots(table, max(lengths), lengths_a)),
        )

    def _read_slots(self, table: np.ndarray, num_read: int, lengths: np.ndarray) -> np.ndarray:
        positions = np.broadcast_to(np.arange(num_read), (table.shape[0], num_read))  # [B, T_kv]
        slots = self._slots(table, positions)
        return np.where(positions >= lengths[:, None], self.null_slot, slots)


def prefill_lengths(
    config: ModelConfig, prompts: list[list[int]], prefixes: list[list[int]]
) -> tuple[list[int], list[int] | None]:
    """Decoder tokens (self KV) and encoder tokens (T5 cross KV) each prefill stores."""
    if config.is_encoder_decoder:
        return [1 + len(prefix) for prefix in prefixes], [len(p) for p in prompts]
    return [len(p) + len(prefix) for p, prefix in zip(prompts, prefixes, strict=True)], None


def _block_table(block_lists: list[list[int]]) -> np.ndarray:
    """[B, M] block ids padded with block 0 (reads past a sequence's end are masked)."""
    width = max(1, max(len(blocks) for blocks in block_lists))
    rows = [blocks + [0] * (width - len(blocks)) for blocks in block_lists]
    return np.array(rows, dtype=np.int64)


# ---- a batch as named tensors (the data plane sends it to pipeline stages) ----------------


def batch_tensors(batch: PrefillBatch | DecodeBatch) -> dict[str, Tensor]:
    """The batch's tensors by dotted field name, None fields left out."""
    named: dict[str, Tensor] = {}
    for name, value in vars(batch).items():
        if isinstance(value, KVIndex):
            named.update({f"{name}.{k}": v for k, v in vars(value).items() if v is not None})
        elif value is not None:
            named[name] = value
    return named


def batch_frame_tensors(batch: PrefillBatch | DecodeBatch) -> dict[str, Tensor]:
    """The tensors a step carries for its batch on the data plane (names prefixed `batch.`)."""
    return {f"batch.{name}": tensor.cpu() for name, tensor in batch_tensors(batch).items()}


def batch_from_tensors(kind: type[PrefillBatch] | type[DecodeBatch], named: dict[str, Tensor]):
    """The inverse of `batch_tensors` (raises ValueError when a required field is missing)."""
    fields: dict[str, object] = {}
    indexes: dict[str, dict[str, Tensor | None]] = {}
    for name, tensor in named.items():
        outer, _, inner = name.partition(".")
        if inner:
            indexes.setdefault(outer, {})[inner] = tensor
        else:
            fields[outer] = tensor
    for outer, parts in indexes.items():
        if "lengths" not in parts:
            raise ValueError(f"{outer} lacks its lengths")
        fields[outer] = KVIndex(
            lengths=parts["lengths"],
            write_slots=parts.get("write_slots"),
            write_rows=parts.get("write_rows"),
            read_slots=parts.get("read_slots"),
        )
    try:
        return kind(**fields)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"not a {kind.__name__}: {exc}") from None
