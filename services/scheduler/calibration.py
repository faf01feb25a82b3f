"""Stage-time predictions from a cost model, and a cost model corrected by what was measured.

A stage-time observation (observations.StageTimeObservation) is compared with what the cost
model predicts for the same work: `num_layers` times the per-layer compute (attention plus the
rest) at the observed batch size and mean length, plus the layer's two tensor-parallel
all-reduces (after attention and after the MLP) when TP > 1. Embedding, LM head and pipeline
transfers are not part of a stage observation. When the median measured / predicted ratio of a
stage kind drifts, the scheduler re-plans with `ScaledCostModel`: the same profile with encode
or decode compute scaled by that ratio, communication and memory unchanged.
"""

from __future__ import annotations

from exegpt.cost_model import CostModel, ModelShape, decode_layer_s, encode_layer_s
from services.scheduler.observations import StageKind, StageTimeObservation


def predict_stage_s(cost_model: CostModel, observation: StageTimeObservation) -> float:
    """What `cost_model` expects the observed stage to take, in seconds."""
    tp = observation.tp_degree
    batch = observation.batch_size
    mean_tokens = max(1, round(observation.num_tokens / batch))
    if observation.stage == StageKind.ENCODE:
        layer = encode_layer_s(cost_model, batch, mean_tokens, observation.num_tokens, tp)
    else:
        mean_cross_tokens = round(observation.num_cross_tokens / batch)
        layer = decode_layer_s(cost_model, batch, mean_tokens, mean_cross_tokens, tp)
    return observation.num_layers * sum(layer)


class ScaledCostModel:
    """A view of a cost model: encode and decode compute times multiplied by a factor each,
    optionally offering only some of its TP degrees (1 is always kept)."""

    def __init__(
        self,
        base: CostModel,
        *,
        encode_scale: float = 1.0,
        decode_scale: float = 1.0,
        tp_degrees: tuple[int, ...] | None = None,
    ) -> None:
        if not (encode_scale > 0 and decode_scale > 0):
            raise ValueError("cost scales must be positive")
        if tp_degrees is not None:
            missing = sorted(set(tp_degrees) - set(base.tp_degrees))
            if missing:
                raise ValueError(
                    f"the profile has no timings for TP degree {missing[0]} "
                    f"(it has {', '.join(map(str, base.tp_degrees))})"
                )
            tp_degrees = tuple(sorted({1, *tp_degrees}))
        self.base = base
        self.encode_scale = encode_scale
        self.decode_scale = decode_scale
        self._tp_degrees = tp_degrees

    def rescaled(self, encode_ratio: float, decode_ratio: float) -> ScaledCostModel:
        """This view with its scales multiplied by the newly observed ratios."""
        return ScaledCostModel(
            self.base,
            encode_scale=self.encode_scale * encode_ratio,
            decode_scale=self.decode_scale * decode_ratio,
            tp_degrees=self._tp_degrees,
        )

    @property
    def shape(self) -> ModelShape:
        return self.base.shape

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        return self._tp_degrees if self._tp_degrees is not None else self.base.tp_degrees

    def encode_attention_s(self, batch_size: int, seq_len_tokens: int, tp_degree: int) -> float:
        base_s = self.base.encode_attention_s(batch_size, seq_len_tokens, tp_degree)
        return self.encode_scale * base_s

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        return self.encode_scale * self.base.encode_rest_s(num_tokens, tp_degree)

    def decode_attention_s(
        self, batch_size: int, kv_len_tokens: int, cross_len_tokens: int, tp_degree: int
    ) -> float:
        base_s = self.base.decode_attention_s(
            batch_size, kv_len_tokens, cross_len_tokens, tp_degree
        )
        return self.decode_scale * base_s

    def decode_rest_s(self, batch_size: int, tp_degree: int) -> float:
        return self.decode_scale * self.base.decode_rest_s(batch_size, tp_degree)

    def embedding_s(self, num_tokens: int) -> float:
        return self.base.embedding_s(num_tokens)

    def lm_head_s(self, num_tokens: int) -> float:
        return self.base.lm_head_s(num_tokens)

    def allreduce_s(self, num_bytes: int, tp_degree: int) -> float:
        return self.base.allreduce_s(num_bytes, tp_degree)

    def transfer_s(self, num_bytes: int) -> float:
        return self.base.transfer_s(num_bytes)

    def encode_layer_weight_bytes(self, tp_degree: int) -> int:
        return self.base.encode_layer_weight_bytes(tp_degree)

    def decode_layer_weight_bytes(self, tp_degree: int) -> int:
        return self.base.decode_layer_weight_bytes(tp_degree)

    def embedding_weight_bytes(self) -> int:
        return self.base.embedding_weight_bytes()

    def kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.base.kv_bytes_per_token(tp_degree)

    def cross_kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.base.cross_kv_bytes_per_token(tp_degree)


def as_scaled(cost_model: CostModel) -> ScaledCostModel:
    return cost_model if isinstance(cost_model, ScaledCostModel) else ScaledCostModel(cost_model)
