"""A cost model simple enough to compute timelines by hand (a real `CostModel`, not a mock).

Encode: `encode_token_s` per token, no attention cost. Decode: `decode_fixed_s` plus
`decode_seq_s` per sequence. TP divides compute by the degree; an all-reduce costs
`allreduce_fixed_s`; a transfer costs `transfer_fixed_s`. Embedding and LM head are free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exegpt.cost_model import ModelShape
from exegpt.serving_overhead import NO_OVERHEAD, ServingOverhead
from services.scheduler.problem import WorkloadDistribution


@dataclass(frozen=True)
class ToyCostModel:
    shape: ModelShape
    encode_token_s: float = 0.001
    decode_fixed_s: float = 0.01
    decode_seq_s: float = 0.001
    transfer_fixed_s: float = 0.002
    allreduce_fixed_s: float = 0.0005
    layer_weight_bytes: int = 1000
    embedding_bytes: int = 500
    kv_bytes: int = 10
    tp_degrees: tuple[int, ...] = (1, 2)

    def encode_attention_s(self, batch_size: int, seq_len_tokens: int, tp_degree: int) -> float:
        return 0.0

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        return self.encode_token_s * num_tokens / tp_degree

    def decode_attention_s(
        self, batch_size: int, kv_len_tokens: int, cross_len_tokens: int, tp_degree: int
    ) -> float:
        return 0.0

    def decode_rest_s(self, batch_size: int, tp_degree: int) -> float:
        return (self.decode_fixed_s + self.decode_seq_s * batch_size) / tp_degree

    def embedding_s(self, num_tokens: int) -> float:
        return 0.0

    def lm_head_s(self, num_tokens: int) -> float:
        return 0.0

    def allreduce_s(self, num_bytes: int, tp_degree: int) -> float:
        return self.allreduce_fixed_s if tp_degree > 1 else 0.0

    def transfer_s(self, num_bytes: int) -> float:
        return self.transfer_fixed_s

    def encode_layer_weight_bytes(self, tp_degree: int) -> int:
        return self.layer_weight_bytes // tp_degree

    def decode_layer_weight_bytes(self, tp_degree: int) -> int:
        return self.layer_weight_bytes // tp_degree

    def embedding_weight_bytes(self) -> int:
        return self.embedding_bytes

    def kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.kv_bytes // tp_degree

    def cross_kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.kv_bytes // tp_degree if self.shape.is_encoder_decoder else 0


@dataclass(frozen=True)
class ServedToyCostModel(ToyCostModel):
    """The toy costs plus the serving path's host work, as a measured profile carries it."""

    serving_overhead: ServingOverhead = NO_OVERHEAD


def decoder_only_shape(num_layers: int = 2) -> ModelShape:
    return ModelShape("toy", False, num_layers, num_layers, 8, 2, 1024)


def pmf(masses: dict[int, float]) -> np.ndarray:
    values = np.zeros(max(masses) + 1)
    for length, mass in masses.items():
        values[length] = mass
    return values


def toy_workload() -> WorkloadDistribution:
    """Inputs of exactly 10 tokens; outputs of 2 (40%) or 3 (60%) tokens."""
    return WorkloadDistribution("toy", pmf({10: 1.0}), pmf({2: 0.4, 3: 0.6}))


@dataclass(frozen=True)
class BumpyCostModel(ToyCostModel):
    """The toy model with one encode size running faster than its neighbours (a cache-friendly
    shape, as measured profiles have): throughput then peaks inside the B_E axis instead of at
    an end, which the corners of a box do not see."""

    bump_tokens: int = 0
    bump_factor: float = 1.0

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        factor = self.bump_factor if num_tokens == self.bump_tokens else 1.0
        return factor * super().encode_rest_s(num_tokens, tp_degree)
