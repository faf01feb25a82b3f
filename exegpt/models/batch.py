"""Per-step batch descriptions the runner hands to a model: token ids and KV slot indices.

These hold only integers (no weights): the runner builds them once per step from the
sequences' block tables, and each model turns them into attention metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

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
    """A T5 prefill: the encoder's prompts packed, the decoder's inputs padded (decoder-only
    prefills are packed whole: `PackedBatch`)."""

    tokens: Tensor  # [B, T] right-padded; Llama: prompt + prefix, T5: [start] + prefix
    lengths: Tensor  # [B] valid tokens per row
    self_kv: KVIndex  # writes the K/V of valid tokens; no reads
    encoder_tokens: Tensor | None = None  # [N] the prompts back to back (T5)
    encoder_lengths: Tensor | None = None  # [B]
    cross_kv: KVIndex | None = None  # T5: writes encoder K/V, reads it back for the decoder


@dataclass(frozen=True)
class DecodeBatch:
    """A T5 decode step (decoder-only steps are packed: `PackedBatch`)."""

    tokens: Tensor  # [B, 1] the last token of each sequence
    positions: Tensor  # [B] position of tokens[:, 0], i.e. the KV length before this step
    self_kv: KVIndex  # writes the new tokens of each sequence, reads [B, T_kv]
    cross_kv: KVIndex | None = None  # T5: reads the encoder K/V


@dataclass(frozen=True)
class PackedBatch:
    """A decoder-only step as packed rows (exegpt/models/packed.py): prefills, prefill chunks
    and decodes alike, in any mix. Row b's new tokens are
    `tokens[query_starts[b]:query_starts[b + 1]]`, from KV position `positions[b]`."""

    tokens: Tensor  # [N] every row's new tokens, back to back (no padding)
    query_starts: Tensor  # [B + 1] offsets of each row's tokens (cu_seqlens)
    positions: Tensor  # [B] KV tokens each row holds before the step
    # lengths [B] after the step; write_slots [N]; read_slots: every row's valid key slots back
    # to back ([sum lengths]), or None when no row has cached K/V (a plain prefill)
    self_kv: KVIndex


class ServingModel(Protocol):
    """What the runner needs from a model family."""

    config: ModelConfig
    embed: nn.Embedding
    decoder_layers: nn.ModuleList
    lm_head: nn.Linear

    def prefill(self, batch: PrefillBatch | PackedBatch, kv: Sequence[LayerKV]) -> Tensor:
        """Logits [B, vocab] at each row's last valid position."""
        ...

    def decode(self, batch: DecodeBatch | PackedBatch, kv: Sequence[LayerKV]) -> Tensor:
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
    ) -> PrefillBatch | PackedBatch:
        """The prefill of fresh sequences; `prefixes` are tokens already generated (recompute).
        Decoder-only: packed rows; T5: padded (its encoder and position bias are per batch)."""
        if not self.config.is_encoder_decoder:
            inputs = [[*p, *prefix] for p, prefix in zip(prompts, prefixes, strict=True)]
            return self.packed(seqs, inputs, [0] * len(seqs))
        self_lengths, cross_lengths = prefill_lengths(self.config, prompts, prefixes)
        start = self.config.decoder_start_token_id or 0
        decoder_inputs = [[start, *prefix] for prefix in prefixes]
        zeros = [0] * len(seqs)
        encoder_tokens = encoder_lengths = cross_kv = None
        if cross_lengths is not None:  # the encoder runs packed: no padding between prompts
            encoder_tokens = self._tensor([t for prompt in prompts for t in prompt])
            encoder_lengths = self._tensor(cross_lengths)
            cross_blocks = [s.cross_blocks for s in seqs]
            cross_kv = self._kv_index(cross_blocks, zeros, cross_lengths, max(cross_lengths))
            cross_kv = replace(cross_kv, write_rows=None)  # the packed rows, all in order
        return PrefillBatch(
            tokens=self._padded(decoder_inputs),
            lengths=self._tensor(self_lengths),
            self_kv=self._kv_index([s.self_blocks for s in seqs], zeros, self_lengths, None),
            encoder_tokens=encoder_tokens,
            encoder_lengths=encoder_lengths,
            cross_kv=cross_kv,
        )

    def decode(
        self, seqs: Sequence[SequenceKV], last_token_ids: list[int]
    ) -> DecodeBatch | PackedBatch:
        """One decode step of prefilled sequences, appending `last_token_ids`."""
        positions = [seq.num_self_tokens for seq in seqs]
        if not self.config.is_encoder_decoder:
            return self.packed(seqs, [[token] for token in last_token_ids], positions)
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

    def packed(
        self, seqs: Sequence[SequenceKV], token_lists: list[list[int]], starts: list[int]
    ) -> PackedBatch:
        """Decoder-only rows: `token_lists[b]` from KV position `starts[b]` (0: a prefill; more:
        a chunk or a decode, attending to the K/V already cached before it)."""
        if self.config.is_encoder_decoder:
            raise ValueError("an encoder-decoder step is not packed (its encoder sees it all)")
        num_new = [len(tokens) for tokens in token_lists]
        lengths = [s + n for s, n in zip(starts, num_new, strict=True)]
        table = _block_table([s.self_blocks for s in seqs])
        write_slots = self._slots(table, *_rows_and_positions(starts, num_new))
        read_slots = None
        if any(starts):
            read_slots = self._slots(table, *_rows_and_positions([0] * len(seqs), lengths))
            read_slots = read_slots.to(self.device)
        query_starts = [0]
        for count in num_new:
            query_starts.append(query_starts[-1] + count)
        return PackedBatch(
            tokens=self._tensor([t for tokens in token_lists for t in tokens]),
            query_starts=self._tensor(query_starts),
            positions=self._tensor(starts),
            self_kv=KVIndex(
                lengths=self._tensor(lengths),
                write_slots=write_slots.to(self.device),
                write_rows=None,
                read_slots=read_slots,
            ),
        )

    def chunk(
        self, seqs: Sequence[SequenceKV], chunks: list[list[int]], starts: list[int]
    ) -> PackedBatch:
        """Prefill chunks of decoder-only sequences: `chunks[b]` from position `starts[b]`,
        attending causally to the K/V of the earlier chunks already in the cache."""
        return self.packed(seqs, chunks, starts)

    def _tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _padded(self, token_lists: list[list[int]]) -> Tensor:
        """Right-padded [B, T_max] token ids."""
        pad = self.config.pad_token_id or 0
        width = max(len(tokens) for tokens in token_lists)
        rows = [tokens + [pad] * (width - len(tokens)) for tokens in token_lists]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _slots(self, table: Tensor, positions: Tensor, rows: Tensor | None = None) -> Tensor:
        """Pool slots of token positions [B, T] given block tables [B, M] (on the host); with
        `rows`, of flat positions [N] in the tables' rows [N]."""
        block_size = self.block_size_tokens
        block_index = (positions // block_size).clamp(max=table.shape[1] - 1)
        if rows is not None:
            return table[rows, block_index] * block_size + positions % block_size
        return table.gather(1, block_index) * block_size + positions % block_size

    def _kv_index(
        self,
        block_lists: list[list[int]],
        starts: list[int],
        num_new: list[int],
        num_read: int | None,
    ) -> KVIndex:
        """Writes of `num_new[b]` tokens from position `starts[b]`, plus reads of `num_read`."""
        table = _block_table(block_lists)
        starts_t = torch.tensor(starts)
        num_new_t = torch.tensor(num_new)
        columns = torch.arange(max(num_new))
        positions = starts_t[:, None] + columns[None]  # [B, T_new]
        write_rows = (columns[None] < num_new_t[:, None]).flatten().nonzero().squeeze(1)  # [N]
        write_slots = self._slots(table, positions).flatten()[write_rows]  # [N]
        read_slots = None
        if num_read is not None:
            read_slots = self._read_slots(table, num_read, starts_t + num_new_t).to(self.device)
        return KVIndex(
            lengths=(starts_t + num_new_t).to(self.device),
            write_slots=write_slots.to(self.device),
            write_rows=write_rows.to(self.device),
            read_slots=read_slots,
        )

    def _read_index(self, block_lists: list[list[int]], lengths: list[int]) -> KVIndex:
        table = _block_table(block_lists)
        return KVIndex(
            lengths=self._tensor(lengths),
            write_slots=None,
            write_rows=None,
            read_slots=self._read_slots(table, max(lengths), torch.tensor(lengths)).to(self.device),
        )

    def _read_slots(self, table: Tensor, num_read: int, lengths: Tensor) -> Tensor:
        positions = torch.arange(num_read)[None].expand(table.shape[0], -1)  # [B, T_kv]
        slots = self._slots(table, positions)
        return slots.masked_fill(positions >= lengths[:, None], self.null_slot)


def prefill_lengths(
    config: ModelConfig, prompts: list[list[int]], prefixes: list[list[int]]
) -> tuple[list[int], list[int] | None]:
    """Decoder tokens (self KV) and encoder tokens (T5 cross KV) each prefill stores."""
    if config.is_encoder_decoder:
        return [1 + len(prefix) for prefix in prefixes], [len(p) for p in prompts]
    return [len(p) + len(prefix) for p, prefix in zip(prompts, prefixes, strict=True)], None


def _rows_and_positions(starts: list[int], counts: list[int]) -> tuple[Tensor, Tensor]:
    """Flat positions [N] = starts[b] .. starts[b] + counts[b] - 1 of every row b, and the row
    [N] of each (for `BatchBuilder._slots`)."""
    counts_t = torch.tensor(counts)
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    row_starts = torch.cumsum(counts_t, 0) - counts_t  # offset of each row's first position
    offsets = torch.arange(int(counts_t.sum())) - row_starts[rows]
    return torch.tensor(starts)[rows] + offsets, rows


def _block_table(block_lists: list[list[int]]) -> Tensor:
    """[B, M] block ids padded with block 0 (reads past a sequence's end are masked)."""
    width = max(1, max(len(blocks) for blocks in block_lists))
    rows = [blocks + [0] * (width - len(blocks)) for blocks in block_lists]
    return torch.tensor(rows, dtype=torch.long)


# ---- a batch as named tensors (the data plane sends it to pipeline stages) ----------------


def batch_tensors(batch: PrefillBatch | DecodeBatch | PackedBatch) -> dict[str, Tensor]:
    """The batch's tensors by dotted field name, None fields left out."""
    named: dict[str, Tensor] = {}
    for name, value in vars(batch).items():
        if isinstance(value, KVIndex):
            named.update({f"{name}.{k}": v for k, v in vars(value).items() if v is not None})
        elif value is not None:
            named[name] = value
    return named


def batch_frame_tensors(batch: PrefillBatch | DecodeBatch | PackedBatch) -> dict[str, Tensor]:
    """The tensors a step carries for its batch on the data plane (names prefixed `batch.`)."""
    return {f"batch.{name}": tensor.cpu() for name, tensor in batch_tensors(batch).items()}


def batch_from_tensors(kind: type[PrefillBatch] | type[DecodeBatch], named: dict[str, Tensor]):
    """The inverse of `batch_tensors` (raises ValueError when a required field is missing).
    A packed batch (decoder-only steps of every kind) is known by its `query_starts`."""
    if "query_starts" in named:
        kind = PackedBatch  # type: ignore[assignment]
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
