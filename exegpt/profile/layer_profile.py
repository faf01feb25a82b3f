"""A measured profile as a `CostModel`: per-layer costs at any operating point.

Load one with `load_profile(path)`. Every query interpolates the measurements monotonically
(`interpolate.py` beside it); a query past the measured grid extrapolates linearly, is
counted in `num_extrapolated_queries`, logs one warning per method, and can be checked with
`is_extrapolated(method, *args)`.

Whole forwards of the real model were timed at every attention grid point. Each grid point's
parts (summed at TP 1 as below) are scaled to its whole forward: the factor whole / parts is
interpolated between the grid points and held at the grid's edge past it
(exegpt/profile/reconcile.py), and one factor applies to every layer of a forward. It can
take either sign of correction: above 1 where the forward does work outside the layers
(index building, masks and position biases, rotary tables) or its layers evict each other's
caches, below 1 where a layer timed alone ran slower than inside the forward. So the sums the
simulator builds add up to the whole forwards at the grid points, and err either way between:

- encoder-decoder (T5): encode(B, S) = embedding_s(B*S) + L_enc x (encode_attention_s +
  encode_rest_s); the first output token then comes from a decode step (B, kv 1, cross S).
  encode_rest_s includes the decoder layers' projection of the encoder output into their
  cross-attention K/V (L_dec/L_enc of one decoder layer's share per encoder layer).
- decoder-only (Llama): prefill(B, S) = embedding_s(B*S) + L x (encode_attention_s +
  encode_rest_s) + lm_head_s(B).
- decode step(B) = embedding_s(B) + L_dec x (decode_attention_s + decode_rest_s) + lm_head_s(B).
- each layer at TP degree t > 1 adds two all-reduces of the layer's activations.

The rest of a layer is scaled by the smallest factor of the forwards of its size, attention
by the rest of its forward's factor (exegpt/profile/reconcile.py); every cost stays a
non-negative time. Being scaled by a factor interpolated from noisy timings, an attention
cost can dip slightly where a larger point's whole forward ran relatively faster: costs are
nearly, not strictly, monotonic (the search allows for that:
services/scheduler/search/plan.py).

This module imports neither torch nor grpc: the simulator can load profiles cheaply.
"""

from __future__ import annotations

import logging
from pathlib import Path

from exegpt.cost_model import ModelShape
from exegpt.profile.format import (
    ComputeData,
    ProfileData,
    ProfileError,
    SeriesData,
    SurfaceData,
    read_profile,
)
from exegpt.profile.interpolate import Curve, Surface
from exegpt.profile.reconcile import ForwardFactor, scaled_attention_s
from exegpt.serving_overhead import NO_OVERHEAD, ServingOverhead

logger = logging.getLogger(__name__)

Query = tuple[float, bool]  # (seconds, extrapolated)
_MAX_CACHED = 1 << 20


def _curve(series: SeriesData) -> Curve:
    return Curve.fit(series.sizes, series.median_s)


def _surface(surface: SurfaceData) -> Surface:
    return Surface.fit([(row.batch_size, row.sizes, row.median_s) for row in surface.rows])


class _Compute:
    """One TP degree's curves and surfaces."""

    def __init__(self, data: ComputeData) -> None:
        self.encode_attention = _surface(data.encode_attention)
        self.encode_rest = _curve(data.encode_rest)
        self.cross_kv_write = _curve(data.cross_kv_write) if data.cross_kv_write else None
        self.decode_self_attention = _surface(data.decode_self_attention)
        cross = data.decode_cross_attention
        self.decode_cross_attention = _surface(cross) if cross else None
        self.decode_rest = _curve(data.decode_rest)


class LayerProfile:
    """Costs of a model's building blocks on one kind of device (implements CostModel)."""

    def __init__(self, data: ProfileData) -> None:
        self.data = data
        model = data.model
        self._shape = ModelShape(
            model_name=model.name,
            is_encoder_decoder=model.is_encoder_decoder,
            num_encode_layers=model.num_encode_layers,
            num_decode_layers=model.num_decode_layers,
            hidden_size=model.hidden_size,
            dtype_bytes=model.dtype_bytes,
            max_context_tokens=model.max_context_tokens,
        )
        self._compute = {tp: _Compute(compute) for tp, compute in data.compute.items()}
        self._embedding = _curve(data.embedding)
        self._lm_head = _curve(data.lm_head)
        self._allreduce = {tp: _curve(comm.series) for tp, comm in data.allreduce.items()}
        self._transfer = _curve(data.transfer.series)
        self._build_overheads()
        self.num_extrapolated_queries = 0
        self._warned: set[str] = set()
        self._cache: dict[tuple[str, tuple[int, ...]], Query] = {}

    # ---- parts reconciled with whole forwards -------------------------------------------

    def _build_overheads(self) -> None:
        """One factor per forward, whole / parts at TP 1 (exegpt/profile/reconcile.py).

        An encoder-decoder prefill's whole includes its first decoder step, which the decode
        factor already reconciles: it is taken off the whole before the encode factor.
        """
        self._decode_factor = ForwardFactor.fit(self.data.decode_whole, self.decode_parts_s)
        self._decode_rest_factor = self._decode_factor.by_batch()
        self._encode_factor = ForwardFactor.fit(
            self.data.prefill_whole, self.prefill_parts_s, self.prefill_first_step_s
        )
        self._encode_rest_factor = self._encode_factor.by_tokens()

    def decode_parts_s(self, batch: int, length: int) -> float:
        """A decode step's parts summed at TP 1 before reconciliation (an encoder-decoder's
        self and cross attention both over `length`, as the grid timed them)."""
        parts = self._compute[1]
        layer = parts.decode_self_attention(batch, length)[0] + parts.decode_rest(batch)[0]
        if parts.decode_cross_attention is not None:
            layer += parts.decode_cross_attention(batch, length)[0]
        outside = self._embedding(batch)[0] + self._lm_head(batch)[0]
        return outside + self._shape.num_decode_layers * layer

    def prefill_parts_s(self, batch: int, seq_len: int) -> float:
        """An encode forward's parts summed at TP 1 before reconciliation (without an
        encoder-decoder's first decoder step: prefill_first_step_s)."""
        num_tokens = batch * seq_len
        attention = self._compute[1].encode_attention(batch, seq_len)[0]
        layer = attention + self._encode_rest_parts(num_tokens, 1)[0]
        return self._encode_outside_s(batch, num_tokens) + self._shape.num_encode_layers * layer

    def prefill_first_step_s(self, batch: int, seq_len: int) -> float:
        """An encoder-decoder prefill's first decoder step, reconciled (0 decoder-only)."""
        if not self._shape.is_encoder_decoder:
            return 0.0
        return self._decode_step_s(batch, 1, seq_len)

    def _encode_outside_s(self, batch: int, num_tokens: int) -> float:
        """What an encode forward does outside its layers (the LM head of a prefill)."""
        head = 0.0 if self._shape.is_encoder_decoder else self._lm_head(batch)[0]
        return self._embedding(num_tokens)[0] + head

    def _decode_step_s(self, batch: int, kv_len: int, cross_len: int) -> float:
        per_layer = self._q_decode_attention(batch, kv_len, cross_len, 1)[0]
        per_layer += self._q_decode_rest(batch, 1)[0]
        outside = self._embedding(batch)[0] + self._lm_head(batch)[0]
        return outside + self._shape.num_decode_layers * per_layer

    @property
    def serving_overhead(self) -> ServingOverhead:
        """Host work of the serving path per step, token and request (zero when the
        profile was measured without its `serving` section)."""
        serving = self.data.serving
        if serving is None:
            return NO_OVERHEAD
        return ServingOverhead(serving.step_s, serving.token_s, serving.request_s)

    # ---- CostModel ------------------------------------------------------------------------

    @property
    def shape(self) -> ModelShape:
        return self._shape

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        return tuple(self.data.tp_degrees)

    def encode_attention_s(self, batch_size: int, seq_len_tokens: int, tp_degree: int) -> float:
        return self._answer("encode_attention_s", (batch_size, seq_len_tokens, tp_degree))

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        return self._answer("encode_rest_s", (num_tokens, tp_degree))

    def decode_attention_s(
        self, batch_size: int, kv_len_tokens: int, cross_len_tokens: int, tp_degree: int
    ) -> float:
        args = (batch_size, kv_len_tokens, cross_len_tokens, tp_degree)
        return self._answer("decode_attention_s", args)

    def decode_rest_s(self, batch_size: int, tp_degree: int) -> float:
        return self._answer("decode_rest_s", (batch_size, tp_degree))

    def embedding_s(self, num_tokens: int) -> float:
        return self._answer("embedding_s", (num_tokens,))

    def lm_head_s(self, num_tokens: int) -> float:
        return self._answer("lm_head_s", (num_tokens,))

    def allreduce_s(self, num_bytes: int, tp_degree: int) -> float:
        return self._answer("allreduce_s", (num_bytes, tp_degree))

    def transfer_s(self, num_bytes: int) -> float:
        return self._answer("transfer_s", (num_bytes,))

    def encode_layer_weight_bytes(self, tp_degree: int) -> int:
        return self.data.memory.encode_layer_weight_bytes[self._check_tp(tp_degree)]

    def decode_layer_weight_bytes(self, tp_degree: int) -> int:
        return self.data.memory.decode_layer_weight_bytes[self._check_tp(tp_degree)]

    def embedding_weight_bytes(self) -> int:
        """Embedding, LM head (once if tied), final norms and T5's relative-position tables
        (replicated on every rank, so the same at every TP degree)."""
        return self.data.memory.embedding_weight_bytes

    def kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.data.memory.kv_bytes_per_token[self._check_tp(tp_degree)]

    def cross_kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.data.memory.cross_kv_bytes_per_token[self._check_tp(tp_degree)]

    # ---- extrapolation ---------------------------------------------------------------------

    def is_extrapolated(self, method: str, *args: int) -> bool:
        """Whether `method(*args)` lies past the measured grid (does not count as a query)."""
        return self._evaluate(method, tuple(args))[1]

    def _answer(self, method: str, args: tuple[int, ...]) -> float:
        value, extrapolated = self._evaluate(method, args)
        if extrapolated:
            self.num_extrapolated_queries += 1
            if method not in self._warned:
                self._warned.add(method)
                logger.warning(
                    "%s%s is outside the measured grid of profile %s: extrapolated linearly",
                    method,
                    args,
                    self.data.profile_id,
                )
        return value

    def _evaluate(self, method: str, args: tuple[int, ...]) -> Query:
        key = (method, args)
        cached = self._cache.get(key)
        if cached is None:
            if any(arg < 0 for arg in args):
                raise ValueError(f"{method}{args}: sizes must be non-negative")
            handler = getattr(self, f"_q_{method.removesuffix('_s')}", None)
            if handler is None:
                raise ValueError(f"{method!r} is not a timing query of the profile")
            cached = handler(*args)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def _check_tp(self, tp_degree: int) -> int:
        if tp_degree not in self.data.compute:
            raise ValueError(
                f"profile {self.data.profile_id} has no measurements for TP degree {tp_degree}; "
                f"it has {self.tp_degrees}"
            )
        return tp_degree

    # ---- the queries -----------------------------------------------------------------------

    def _q_encode_attention(self, batch: int, seq_len: int, tp: int) -> Query:
        kernel, extrapolated = self._compute[self._check_tp(tp)].encode_attention(batch, seq_len)
        num_tokens = batch * seq_len
        outside = self._encode_outside_s(batch, num_tokens) / self._shape.num_encode_layers
        factor, factor_out = self._encode_factor(batch, seq_len)
        value = scaled_attention_s(
            factor,
            kernel,
            self._encode_rest_factor(num_tokens),
            self._encode_rest_parts(num_tokens, tp)[0],
            outside,
        )
        return value, extrapolated or factor_out

    def _q_encode_rest(self, num_tokens: int, tp: int) -> Query:
        value, extrapolated = self._encode_rest_parts(num_tokens, tp)
        return self._encode_rest_factor(num_tokens) * value, extrapolated

    def _encode_rest_parts(self, num_tokens: int, tp: int) -> Query:
        """The rest of an encode layer as measured (T5: with its share of the cross-KV write)."""
        compute = self._compute[self._check_tp(tp)]
        value, extrapolated = compute.encode_rest(num_tokens)
        if compute.cross_kv_write is not None:
            cross, cross_out = compute.cross_kv_write(num_tokens)
            shape = self._shape
            value += cross * shape.num_decode_layers / shape.num_encode_layers
            extrapolated = extrapolated or cross_out
        return value, extrapolated

    def _q_decode_attention(self, batch: int, kv_len: int, cross_len: int, tp: int) -> Query:
        compute = self._compute[self._check_tp(tp)]
        value, extrapolated = compute.decode_self_attention(batch, kv_len)
        factor, factor_out = self._decode_factor(batch, kv_len)
        extrapolated = extrapolated or factor_out
        if cross_len > 0 and compute.decode_cross_attention is not None:
            cross, cross_out = compute.decode_cross_attention(batch, cross_len)
            cross_factor, cross_factor_out = self._decode_factor(batch, cross_len)
            value += cross
            extrapolated = extrapolated or cross_out or cross_factor_out
            # the grid timed both lengths equal: each length brings half the factor
            factor = (factor + cross_factor) / 2
        outside = self._embedding(batch)[0] + self._lm_head(batch)[0]
        rest = compute.decode_rest(batch)[0]
        rest_factor = self._decode_rest_factor(batch)
        outside /= self._shape.num_decode_layers
        return scaled_attention_s(factor, value, rest_factor, rest, outside), extrapolated

    def _q_decode_rest(self, batch: int, tp: int) -> Query:
        value, extrapolated = self._compute[self._check_tp(tp)].decode_rest(batch)
        return self._decode_rest_factor(batch) * value, extrapolated

    def _q_embedding(self, num_tokens: int) -> Query:
        return self._embedding(num_tokens)

    def _q_lm_head(self, num_tokens: int) -> Query:
        return self._lm_head(num_tokens)

    def _q_allreduce(self, num_bytes: int, tp: int) -> Query:
        if self._check_tp(tp) == 1 or num_bytes == 0:
            return 0.0, False
        return self._allreduce[tp](num_bytes)

    def _q_transfer(self, num_bytes: int) -> Query:
        return (0.0, False) if num_bytes == 0 else self._transfer(num_bytes)


def load_profile(path: str | Path, expected_config_hash: str | None = None) -> LayerProfile:
    """Read, validate and wrap a profile file (raises ProfileError with the reason)."""
    return LayerProfile(read_profile(path, expected_config_hash))


__all__ = ["LayerProfile", "ProfileError", "load_profile"]
