"""A measured profile as a `CostModel`: per-layer costs at any operating point.

Load one with `load_profile(path)`. Every query interpolates the measurements monotonically
(`interpolate.py` beside it); a query past the measured grid extrapolates linearly, is
counted in `num_extrapolated_queries`, logs one warning per method, and can be checked with
`is_extrapolated(method, *args)`.

Whole forwards of the real model were timed at every attention grid point; what each took
beyond the parts the profile sums for it (at TP 1) is the per-forward overhead: the work a
forward does once outside the layers (index building, masks and position biases, rotary
tables), and what the layers cost inside a forward beyond their cost in a loop (caches the
rest of the model evicted). The remainder is kept as measured, interpolated linearly
between the grid points, and added to the attention costs, which stay the measured rising
curves otherwise; where noise made the parts outweigh the whole it is taken as zero (the
parts are trusted: a remainder below zero could take an attention cost to nothing). So the
sums the simulator builds add up to whole forwards, exactly at the grid points where the
whole took longer than its parts:

- encoder-decoder (T5): encode(B, S) = embedding_s(B*S) + L_enc x (encode_attention_s +
  encode_rest_s); the first output token then comes from a decode step (B, kv 1, cross S).
  encode_rest_s includes the decoder layers' projection of the encoder output into their
  cross-attention K/V (L_dec/L_enc of one decoder layer's share per encoder layer).
- decoder-only (Llama): prefill(B, S) = embedding_s(B*S) + L x (encode_attention_s +
  encode_rest_s) + lm_head_s(B).
- decode step(B) = embedding_s(B) + L_dec x (decode_attention_s + decode_rest_s) + lm_head_s(B).
- each layer at TP degree t > 1 adds two all-reduces of the layer's activations.

The overheads are apportioned to the attention methods (they scale with the batch and the
sequence lengths, as attention does). Being remainders of noisy timings, they can make an
attention cost dip slightly where a larger point's whole forward ran relatively faster:
costs are nearly, not strictly, monotonic (the search allows for that:
services/scheduler/search/plan.py).

This module imports neither torch nor grpc: the simulator can load profiles cheaply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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

logger = logging.getLogger(__name__)

Query = tuple[float, bool]  # (seconds, extrapolated)
_MAX_CACHED = 1 << 20


def _curve(series: SeriesData) -> Curve:
    return Curve.fit(series.sizes, series.median_s)


def _surface(surface: SurfaceData) -> Surface:
    return Surface.fit([(row.batch_size, row.sizes, row.median_s) for row in surface.rows])


def _remainder_surface(surface: SurfaceData, value: Callable[[int, int, float], float]) -> Surface:
    """A surface on the same grid with each median replaced by value(batch, size, median), a
    remainder: floored at zero, otherwise interpolated as measured, not smoothed into a
    rising cost (Curve.fit)."""
    rows = [
        (
            row.batch_size,
            row.sizes,
            [
                max(0.0, value(row.batch_size, s, m))
                for s, m in zip(row.sizes, row.median_s, strict=True)
            ],
        )
        for row in surface.rows
    ]
    return Surface.fit(rows, monotone=False)


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

    # ---- per-forward overheads -----------------------------------------------------------

    def _build_overheads(self) -> None:
        """Overhead = a whole forward at a grid point minus the parts summed for it at TP 1.

        Encoder-decoder decode steps split theirs evenly between the self-attention length
        and the cross-attention length (the grid timed both over the same length).
        """
        shape = self._shape
        parts = self._compute[1]
        share = 0.5 if shape.is_encoder_decoder else 1.0

        def decode_overhead(batch: int, length: int, whole_s: float) -> float:
            layer = parts.decode_self_attention(batch, length)[0] + parts.decode_rest(batch)[0]
            if parts.decode_cross_attention is not None:
                layer += parts.decode_cross_attention(batch, length)[0]
            outside = self._embedding(batch)[0] + self._lm_head(batch)[0]
            return (whole_s - outside - shape.num_decode_layers * layer) * share

        self._decode_overhead = _remainder_surface(self.data.decode_whole, decode_overhead)

        def encode_overhead(batch: int, seq_len: int, whole_s: float) -> float:
            num_tokens = batch * seq_len
            layer = (
                parts.encode_attention(batch, seq_len)[0] + self._q_encode_rest(num_tokens, 1)[0]
            )
            summed = self._embedding(num_tokens)[0] + shape.num_encode_layers * layer
            if shape.is_encoder_decoder:  # the decoder's first step, overhead included
                summed += self._decode_step_s(batch, 1, seq_len)
            else:
                summed += self._lm_head(batch)[0]
            return whole_s - summed

        self._encode_overhead = _remainder_surface(self.data.prefill_whole, encode_overhead)

    def _decode_step_s(self, batch: int, kv_len: int, cross_len: int) -> float:
        per_layer = self._q_decode_attention(batch, kv_len, cross_len, 1)[0]
        per_layer += self._q_decode_rest(batch, 1)[0]
        outside = self._embedding(batch)[0] + self._lm_head(batch)[0]
        return outside + self._shape.num_decode_layers * per_layer

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
        kernel, out_k = self._compute[self._check_tp(tp)].encode_attention(batch, seq_len)
        overhead, out_o = self._encode_overhead(batch, seq_len)
        return kernel + overhead / self._shape.num_encode_layers, out_k or out_o

    def _q_encode_rest(self, num_tokens: int, tp: int) -> Query:
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
        num_layers = self._shape.num_decode_layers
        value, extrapolated = compute.decode_self_attention(batch, kv_len)
        overhead, overhead_out = self._decode_overhead(batch, kv_len)
        value += overhead / num_layers
        extrapolated = extrapolated or overhead_out
        if cross_len > 0 and compute.decode_cross_attention is not None:
            cross, cross_out = compute.decode_cross_attention(batch, cross_len)
            overhead, overhead_out = self._decode_overhead(batch, cross_len)
            value += cross + overhead / num_layers
            extrapolated = extrapolated or cross_out or overhead_out
        return value, extrapolated

    def _q_decode_rest(self, batch: int, tp: int) -> Query:
        return self._compute[self._check_tp(tp)].decode_rest(batch)

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
