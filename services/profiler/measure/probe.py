"""Probe models: the real model with its layers swapped for recorders.

Running the engine's ModelRunner on a probe model executes everything a step does outside
the layers (the runner's index building, the model's masks, position biases and rotary
tables, the embedding, the final norm and the LM head) and records exactly what each layer
would have received. The profiler times that outer work as the per-forward overhead, and
replays the recorded inputs through real (sharded) layers to time the layers themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from exegpt.models.attention import LayerKV
from exegpt.models.checkpoint import Model, create_model
from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, SequenceKV, blocks_for
from exegpt.models.loader import LoadedModel
from exegpt.models.runner import ModelRunner

_LAYER_LISTS = ("encoder_layers", "decoder_layers")


@dataclass(frozen=True)
class LayerCall:
    """What a model handed to one layer: `kind` is "encoder", "decoder" or "cross_kv"."""

    kind: str
    x: Tensor  # [B, T, d_model] layer input (cross_kv: the encoder output)
    kv: LayerKV | None
    meta: Any  # AttentionMetadata, or T5DecoderMetadata for T5 decoder layers


class ProbeLayer(nn.Module):
    """Stands in for a layer: records its inputs, computes nothing, returns its input."""

    def __init__(self, kind: str, calls: list[LayerCall], self_attn: nn.Module | None) -> None:
        super().__init__()
        self.kind = kind
        self.calls = calls
        if self_attn is not None:
            self.self_attn = self_attn  # T5: the model reads its position table from here

    def write_cross_kv(self, encoder_out: Tensor, kv: LayerKV, meta: Any) -> None:
        self.calls.append(LayerCall("cross_kv", encoder_out, kv, meta))

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        kv, meta = (None, args[0]) if self.kind == "encoder" else args
        self.calls.append(LayerCall(self.kind, x, kv, meta))
        return x


def build_probe_model(model: Model, calls: list[LayerCall]) -> Model:
    """The model with one recording layer per stack, sharing every other module."""
    config = model.config
    probe_config = replace(
        config, num_encoder_layers=min(1, config.num_encoder_layers), num_decoder_layers=1
    )
    probe = create_model(probe_config, device="meta")
    for name, child in model.named_children():
        if name not in _LAYER_LISTS:
            setattr(probe, name, child)
    for name, kind in zip(_LAYER_LISTS, ("encoder", "decoder"), strict=True):
        layers: nn.ModuleList = getattr(model, name)
        if len(layers):
            self_attn = getattr(layers[0], "self_attn", None) if config.family == "t5" else None
            setattr(probe, name, nn.ModuleList([ProbeLayer(kind, calls, self_attn)]))
    if config.family == "t5":
        probe.position_tables = model.position_tables  # the real first layers' tables
    return probe


class Steps:
    """Repeatable batch steps on a runner: the same prefill or decode step every call."""

    def __init__(self, runner: ModelRunner, config: ModelConfig, seed: int = 0) -> None:
        self.runner = runner
        self.pool = runner.pool
        self.config = config
        self.calls: list[LayerCall] | None = None  # cleared before each step when set
        self._generator = torch.Generator().manual_seed(seed)

    def prompts(self, batch_size: int, num_tokens: int) -> list[list[int]]:
        low = 2  # above the special ids of the default model
        shape = (batch_size, num_tokens)
        ids = torch.randint(low, self.config.vocab_size, shape, generator=self._generator)
        return ids.tolist()

    def prefill_step(self, batch_size: int, seq_len: int) -> Callable[[], None]:
        """A prefill of `batch_size` prompts of `seq_len` tokens, blocks released after."""
        prompts = self.prompts(batch_size, seq_len)

        def step() -> None:
            if self.calls is not None:
                self.calls.clear()
            seqs = [SequenceKV() for _ in prompts]
            self.runner.prefill(seqs, prompts)
            for seq in seqs:
                self.runner.release(seq)

        return step

    def decode_sequences(self, batch_size: int, kv_len: int, cross_len: int) -> list[SequenceKV]:
        """Sequences holding `kv_len` cached tokens and, for T5, `cross_len` encoder tokens.

        Blocks are taken straight from the pool: a step's cost does not depend on what the
        cached K/V hold, so no prefill is needed to set a sequence up.
        """
        block_size = self.pool.block_size_tokens
        seqs = []
        for _ in range(batch_size):
            seq = SequenceKV(self_blocks=self.pool.allocate(blocks_for(kv_len + 1, block_size)))
            seq.num_self_tokens = kv_len
            if self.config.is_encoder_decoder:
                seq.cross_blocks = self.pool.allocate(blocks_for(cross_len, block_size))
                seq.num_cross_tokens = cross_len
            seqs.append(seq)
        return seqs

    def decode_step(self, seqs: list[SequenceKV]) -> Callable[[], None]:
        """One decode step of the sequences, rewound after so every repeat is the same step."""
        last_tokens = [token for [token] in self.prompts(len(seqs), 1)]
        kv_lens = [seq.num_self_tokens for seq in seqs]

        def step() -> None:
            if self.calls is not None:
                self.calls.clear()
            self.runner.decode(seqs, last_tokens)
            for seq, kv_len in zip(seqs, kv_lens, strict=True):
                seq.num_self_tokens = kv_len

        return step

    def release(self, seqs: list[SequenceKV]) -> None:
        for seq in seqs:
            self.runner.release(seq)


class Probe:
    """Steps over the probe model and a one-layer KV pool sized for the grid."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size_tokens: int) -> None:
        self.calls: list[LayerCall] = []
        self.model = build_probe_model(loaded.model, self.calls)
        spec = KVCacheSpec.for_model(self.model.config, dtype=loaded.dtype)
        self.pool = KVCachePool(spec, num_blocks, block_size_tokens, device=loaded.device)
        self.steps = Steps(ModelRunner(self.model, self.pool), loaded.config)
        self.steps.calls = self.calls

    def recorded(self, kind: str) -> LayerCall:
        """The last step's call of the given kind (run a step first)."""
        for call in self.calls:
            if call.kind == kind:
                return call
        raise LookupError(f"the last step made no {kind!r} layer call")
