"""The contract between the profiler and the simulator: per-layer costs at any operating point.

The profiler (services/profiler) measures these on a device and publishes a profile that
implements `CostModel`; the simulator (services/scheduler) composes them into pipeline
timelines. Neither side imports the other: both depend only on this file.

Conventions
- "encode" is the encoder layer of an encoder-decoder model, or the prefill pass of a
  decoder layer in a decoder-only model; "decode" is one generation step of a decoder layer.
- Every time is for ONE layer (or one embedding / head call), in seconds, on ONE device of a
  tensor-parallel group of degree `tp_degree` (the layer sharded as the TP worker shards it).
  The all-reduce a TP layer needs is not included; add `allreduce_s`.
- Memory is exact bytes for the given tensor-parallel shard.
- Optionally, a cost model carries `serving_overhead` (exegpt/serving_overhead.py): the
  serving path's host work per step, token and request, which the simulator adds to the
  forwards. A cost model without it (an analytic one) prices the forwards alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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


# ---- one layer at an operating point (the simulator and the calibration compose these) ----

ALLREDUCES_PER_LAYER = 2  # after attention and after the feed-forward


def layer_allreduce_s(cost_model: CostModel, num_tokens: int, tp_degree: int) -> float:
    """The all-reduces one TP layer does for `num_tokens` activations (0 at degree 1)."""
    if tp_degree == 1:
        return 0.0
    num_bytes = num_tokens * cost_model.shape.hidden_bytes_per_token
    return ALLREDUCES_PER_LAYER * cost_model.allreduce_s(num_bytes, tp_degree)


def encode_layer_s(
    cost_model: CostModel, batch_size: int, attention_tokens: int, num_tokens: int, tp: int
) -> tuple[float, float]:
    """(compute, all-reduce) seconds of one encode layer: `batch_size` sequences whose
    attention costs as `attention_tokens` each, `num_tokens` in all."""
    compute_s = cost_model.encode_attention_s(batch_size, attention_tokens, tp)
    compute_s += cost_model.encode_rest_s(num_tokens, tp)
    return compute_s, layer_allreduce_s(cost_model, num_tokens, tp)


def decode_layer_s(
    cost_model: CostModel, batch_size: int, kv_tokens: int, cross_tokens: int, tp: int
) -> tuple[float, float]:
    """(compute, all-reduce) seconds of one decode step of one layer (one new token per
    sequence)."""
    compute_s = cost_model.decode_attention_s(batch_size, kv_tokens, cross_tokens, tp)
    compute_s += cost_model.decode_rest_s(batch_size, tp)
    return compute_s, layer_allreduce_s(cost_model, batch_size, tp)
