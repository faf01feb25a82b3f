"""Predictions of what engines report, and a cost model corrected by what was measured.

An observation (observations.StageTimeObservation) is compared with what the cost model
predicts for the same work, composed as the simulator composes it (exegpt/cost_model.py):

- encode / decode: `num_layers` times one layer's compute plus its TP all-reduces, at the
  observed batch size and mean length (no embedding, LM head or transfer); an encode timed
  with an encoder-decoder's decoder layers adds their first decode step (KV 1, over the
  prompt), as the simulator prices a prefill (simulator/common.py `encode_times`);
- transfer: `transfer_s` of the observed tokens' activations;
- overhead: the serving path's host work of a step of `batch_size` rows, when the cost model
  carries such terms (`serving_overhead`); without them there is nothing to correct.

A `Calibration` holds one factor per kind, measured / predicted, and how many observations it
rests on. `ScaledCostModel` is the profile seen through it: encode compute, decode compute,
transfers and the serving-overhead terms each multiplied by their own factor; memory and
all-reduces unchanged. The scheduler re-plans with it when a kind drifts, and keeps it beside
the profile (calibration_store.py) so that the next plan starts from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exegpt.cost_model import CostModel, ModelShape, decode_layer_s, encode_layer_s
from exegpt.serving_overhead import ServingOverhead, serving_overhead_of
from services.scheduler.observations import StageKind, StageTimeObservation


def predict_stage_s(cost_model: CostModel, observation: StageTimeObservation) -> float:
    """What `cost_model` expects the observed work to take, in seconds (0: it has no term
    for it)."""
    tp, batch = observation.tp_degree, observation.batch_size
    if observation.stage == StageKind.TRANSFER:
        return cost_model.transfer_s(
            observation.num_tokens * cost_model.shape.hidden_bytes_per_token
        )
    if observation.stage == StageKind.OVERHEAD:
        return serving_overhead_of(cost_model).decode_step_s(batch)
    mean_tokens = max(1, round(observation.num_tokens / batch))
    if observation.stage == StageKind.ENCODE:
        layer = encode_layer_s(cost_model, batch, mean_tokens, observation.num_tokens, tp)
        return observation.num_layers * sum(layer) + first_step_s(cost_model, observation)
    mean_cross_tokens = round(observation.num_cross_tokens / batch)
    layer = decode_layer_s(cost_model, batch, mean_tokens, mean_cross_tokens, tp)
    return observation.num_layers * sum(layer)


def first_step_s(cost_model: CostModel, observation: StageTimeObservation) -> float:
    """The decoder's first step an encode observation holds (0 when it holds none): its
    `num_first_step_layers` at KV 1 over the batch's mean prompt."""
    if not observation.num_first_step_layers:
        return 0.0
    batch = observation.batch_size
    mean_tokens = max(1, round(observation.num_tokens / batch))
    layer = decode_layer_s(cost_model, batch, 1, mean_tokens, observation.tp_degree)
    return observation.num_first_step_layers * sum(layer)


def stage_ratio(cost_model: CostModel, observation: StageTimeObservation) -> float | None:
    """Measured / predicted for the observation's own kind of cost (None: nothing to compare).
    An encode that holds the decoder's first step has that step, as `cost_model` prices it
    (at its decode factor), taken off first, so only the encoder layers' error moves the
    encode factor, as the calibration pass reads it (exegpt/commands/calibration_pass.py)."""
    predicted_s = predict_stage_s(cost_model, observation)
    step_s = first_step_s(cost_model, observation)
    measured_s = observation.measured_s - step_s
    predicted_s -= step_s
    if predicted_s <= 0 or measured_s <= 0:
        return None
    return measured_s / predicted_s


@dataclass(frozen=True)
class Calibration:
    """Measured / predicted per kind of cost, and the observations behind each factor."""

    factors: Mapping[StageKind, float] = field(default_factory=dict)
    counts: Mapping[StageKind, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, factor in self.factors.items():
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"calibration: the {kind} factor must be positive, got {factor}")
        if any(count < 0 for count in self.counts.values()):
            raise ValueError("calibration: observation counts must be >= 0")

    def factor(self, kind: StageKind) -> float:
        return self.factors.get(kind, 1.0)

    @property
    def num_observations(self) -> int:
        return sum(self.counts.values())

    def updated(
        self, ratios: Mapping[StageKind, float], counts: Mapping[StageKind, int]
    ) -> Calibration:
        """This calibration corrected by ratios measured against it (each kind on its own)."""
        factors = dict(self.factors)
        totals = dict(self.counts)
        for kind, ratio in ratios.items():
            factors[kind] = self.factor(kind) * ratio
            totals[kind] = totals.get(kind, 0) + counts.get(kind, 0)
        return Calibration(factors, totals)

    def replaced_by(self, newer: Calibration) -> Calibration:
        """This calibration with every kind that `newer` measured taken from `newer` (a later
        pass, made against the uncalibrated profile); the other kinds keep their factor."""
        factors = {**self.factors, **newer.factors}
        counts = {**self.counts, **{k: newer.counts.get(k, 0) for k in newer.factors}}
        return Calibration(factors, counts)

    def describe(self) -> str:
        """'calibrated from N observations (encode x1.20 from 12, ...)', or 'uncalibrated'."""
        if not self.num_observations:
            return "uncalibrated"
        kinds = [kind for kind in StageKind if self.counts.get(kind)]
        details = ", ".join(f"{k} x{self.factor(k):.2f} from {self.counts[k]}" for k in kinds)
        return f"calibrated from {self.num_observations} observations ({details})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "factors": {
                kind.value: self.factors[kind] for kind in StageKind if kind in self.factors
            },
            "counts": {kind.value: self.counts[kind] for kind in StageKind if kind in self.counts},
        }

    @classmethod
    def from_dict(cls, raw: object) -> Calibration:
        """From `to_dict`'s form (raises ValueError naming what is wrong)."""
        if not isinstance(raw, dict) or set(raw) - {"factors", "counts"}:
            raise ValueError("a calibration is an object with 'factors' and 'counts'")
        factors, counts = raw.get("factors", {}), raw.get("counts", {})
        if not isinstance(factors, dict) or not isinstance(counts, dict):
            raise ValueError("calibration 'factors' and 'counts' must be objects")
        try:
            return cls(
                {StageKind(k): _number(v, float) for k, v in factors.items()},
                {StageKind(k): _number(v, int) for k, v in counts.items()},
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"calibration: {exc}") from None


def _number(value: object, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    if kind is int and value != int(value):
        raise ValueError(f"{value!r} is not a whole number")
    return kind(value)


class ScaledCostModel:
    """A view of a cost model through a `Calibration`, optionally offering only some of its
    TP degrees (1 is always kept). `calibration_path` is where the calibration is kept (beside
    a profile file; None for a model that has no file)."""

    def __init__(
        self,
        base: CostModel,
        *,
        calibration: Calibration | None = None,
        tp_degrees: tuple[int, ...] | None = None,
        calibration_path: Path | None = None,
    ) -> None:
        if tp_degrees is not None:
            missing = sorted(set(tp_degrees) - set(base.tp_degrees))
            if missing:
                raise ValueError(
                    f"the profile has no timings for TP degree {missing[0]} "
                    f"(it has {', '.join(map(str, base.tp_degrees))})"
                )
            tp_degrees = tuple(sorted({1, *tp_degrees}))
        self.base = base
        self.calibration = calibration or Calibration()
        self.calibration_path = calibration_path
        self._tp_degrees = tp_degrees
        self._encode = self.calibration.factor(StageKind.ENCODE)
        self._decode = self.calibration.factor(StageKind.DECODE)

    def rescaled(
        self, ratios: Mapping[StageKind, float], counts: Mapping[StageKind, int]
    ) -> ScaledCostModel:
        """This view with its calibration corrected by newly observed ratios."""
        return ScaledCostModel(
            self.base,
            calibration=self.calibration.updated(ratios, counts),
            tp_degrees=self._tp_degrees,
            calibration_path=self.calibration_path,
        )

    @property
    def shape(self) -> ModelShape:
        return self.base.shape

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        return self._tp_degrees if self._tp_degrees is not None else self.base.tp_degrees

    @property
    def serving_overhead(self) -> ServingOverhead:
        """The base's serving-overhead terms, each times the overhead factor."""
        return serving_overhead_of(self.base).scaled(self.calibration.factor(StageKind.OVERHEAD))

    def encode_attention_s(self, batch_size: int, seq_len_tokens: int, tp_degree: int) -> float:
        return self._encode * self.base.encode_attention_s(batch_size, seq_len_tokens, tp_degree)

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        return self._encode * self.base.encode_rest_s(num_tokens, tp_degree)

    def decode_attention_s(
        self, batch_size: int, kv_len_tokens: int, cross_len_tokens: int, tp_degree: int
    ) -> float:
        base_s = self.base.decode_attention_s(
            batch_size, kv_len_tokens, cross_len_tokens, tp_degree
        )
        return self._decode * base_s

    def decode_rest_s(self, batch_size: int, tp_degree: int) -> float:
        return self._decode * self.base.decode_rest_s(batch_size, tp_degree)

    def embedding_s(self, num_tokens: int) -> float:
        return self.base.embedding_s(num_tokens)

    def lm_head_s(self, num_tokens: int) -> float:
        return self.base.lm_head_s(num_tokens)

    def allreduce_s(self, num_bytes: int, tp_degree: int) -> float:
        return self.base.allreduce_s(num_bytes, tp_degree)

    def transfer_s(self, num_bytes: int) -> float:
        return self.calibration.factor(StageKind.TRANSFER) * self.base.transfer_s(num_bytes)

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
