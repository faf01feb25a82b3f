"""The contract between the profiler and the simulator: per-layer costs at any operating point.

The profiler (services/profiler) measures these on a device and writes a profile file
(exegpt/profile: its format, and `LayerProfile`, the `CostModel` a file loads into); the
simulator (services/scheduler) composes them into pipeline timelines. Neither service imports
the other: both depend only on exegpt/. A layer's time at an operating point is composed once,
here (`encode_layer_s`, `decode_layer_s`), for the simulator, calibration and validation.

Conventions
- "encode" is the encoder layer of an encoder-decoder model, or the prefill pass of a
  decoder layer in a decoder-only model; "decode" is one generation step of a decoder layer.
- Every time is for ONE layer (or one embedding / head call), in seconds, on ONE device of a
  tensor-parallel group of degree `tp_degree` (the layer sharded as the TP worker shards it).
  The all-reduce a TP layer needs is not included: `layer_allreduce_s` adds it.
- Memory is exact bytes for the given tensor-parallel shard.
- Optionally, a cost model carries `serving_overhead` (exegpt/serving_overhead.py): the
  serving path's host work per step, token and request, which the simulator adds to the
  forwards. A cost model without it (an analytic one) prices the forwards alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ModelShape:
    """What the simulator needs to know about the model itself."""

    model_name: str
    is_encoder_decoder: bool
    num_encode_layers: int  # encoder layers, or the decoder layers run as prefill
    num_decode_layers: int
    hidden_size: int
    dtype_bytes: int
    max_context_tokens: int

    @property
    def hidden_bytes_per_token(self) -> int:
        """Size of one token's activation as it crosses a pipeline-stage boundary."""
        return self.hidden_size * self.dtype_bytes


@runtime_checkable
class CostModel(Protocol):
    """Costs of a model's building blocks on one kind of device."""

    @property
    def shape(self) -> ModelShape: ...

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        """Tensor-parallel degrees this cost model has numbers for (always includes 1)."""
        ...

    # ---- compute (seconds per layer per device) -------------------------------------------

    def encode_attention_s(self, batch_size: int, seq_len_tokens: int, tp_degree: int) -> float:
        """Attention kernel of an encode layer: `batch_size` sequences of `seq_len_tokens`."""
        ...

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        """Everything but the attention kernel in an encode layer, for `num_tokens` in the batch."""
        ...

    def decode_attention_s(
        self, batch_size: int, kv_len_tokens: int, cross_len_tokens: int, tp_degree: int
    ) -> float:
        """Attention of one decode step: self-attention over `kv_len_tokens` cached tokens plus,
        for encoder-decoder models, cross-attention over `cross_len_tokens` (0 otherwise)."""
        ...

    def decode_rest_s(self, batch_size: int, tp_degree: int) -> float:
        """Everything but attention in one decode step of a decoder layer for the batch."""
        ...

    def embedding_s(self, num_tokens: int) -> float: ...

    def lm_head_s(self, num_tokens: int) -> float: ...

    # ---- communication ---------------------------------------------------------------------

    def allreduce_s(self, num_bytes: int, tp_degree: int) -> float:
        """One all-reduce of `num_bytes` across a TP group (0 for degree 1)."""
        ...

    def transfer_s(self, num_bytes: int) -> float:
        """Handing `num_bytes` from one pipeline stage to the next (the workers' transport)."""
        ...

    # ---- memory (exact bytes per device) ---------------------------------------------------

    def encode_layer_weight_bytes(self, tp_degree: int) -> int: ...

    def decode_layer_weight_bytes(self, tp_degree: int) -> int: ...

    def embedding_weight_bytes(self) -> int:
        """Embedding table plus LM head (once if tied) plus final norms."""
        ...

    def kv_bytes_per_token(self, tp_degree: int) -> int:
        """Self-attention K and V of one token in one decoder layer."""
        ...

    def cross_kv_bytes_per_token(self, tp_degree: int) -> int:
        """Cross-attention K and V of one encoder token in one decoder layer (0 decoder-only)."""
        ...


# ---- one layer's time, as every user of a cost model composes it ----------------------------

ALLREDUCES_PER_LAYER = 2  # a TP layer all-reduces after attention and after the FFN


def layer_allreduce_s(model: CostModel, num_tokens: int, tp_degree: int) -> float:
    """The all-reduces of one TP layer over `num_tokens` activations (0 at TP 1)."""
    if tp_degree == 1:
        return 0.0
    num_bytes = num_tokens * model.shape.hidden_bytes_per_token
    return ALLREDUCES_PER_LAYER * model.allreduce_s(num_bytes, tp_degree)


def encode_layer_s(
    model: CostModel, batch_size: int, seq_len_tokens: int, num_tokens: int, tp_degree: int
) -> tuple[float, float]:
    """(compute_s, allreduce_s) of one encode layer: `batch_size` sequences of
    `seq_len_tokens` for attention, `num_tokens` in all for the rest."""
    compute_s = model.encode_attention_s(batch_size, seq_len_tokens, tp_degree)
    compute_s += model.encode_rest_s(num_tokens, tp_degree)
    return compute_s, layer_allreduce_s(model, num_tokens, tp_degree)


def decode_layer_s(
    model: CostModel, batch_size: int, kv_tokens: int, cross_tokens: int, tp_degree: int
) -> tuple[float, float]:
    """(compute_s, allreduce_s) of one decode step of one layer: one new token per sequence,
    attending to `kv_tokens` of its own and `cross_tokens` of the encoder's."""
    compute_s = model.decode_attention_s(batch_size, kv_tokens, cross_tokens, tp_degree)
    compute_s += model.decode_rest_s(batch_size, tp_degree)
    return compute_s, layer_allreduce_s(model, batch_size, tp_degree)


def batch_weights(rows: float) -> tuple[tuple[int, float], tuple[int, float]]:
    """A mean batch of `rows` (at least one) as two whole batch sizes and their weights:
    linear between them, so exact wherever a cost is affine in its rows."""
    rows = max(1.0, rows)
    low = math.floor(rows)
    return (low, 1.0 - (rows - low)), (low + 1, rows - low)


def at_rows(rows: float, cost_of: Callable[[int], Any]) -> Any:
    """`cost_of` at a mean of `rows` per step (at least one), linear between the whole batch
    sizes around it (`batch_weights`): the one way the simulator and the calibration price a
    fractional batch. `cost_of` returns a number or a numpy array of them."""
    return sum(weight * cost_of(whole) for whole, weight in batch_weights(rows) if weight > 0)
