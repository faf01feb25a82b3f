"""Check a profile against whole-model forwards: predicted vs measured time.

Predictions use only the `CostModel` interface, composed the way the profile documents
(services/profiler/profile.py), so a small error here means the simulator gets sums it can
trust. Measurements run the engine's ModelRunner on the real model and KV pool, unsharded
(TP 1), with the thread count the profile was taken with.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from exegpt.allocator import configure_allocator
from exegpt.cost_model import CostModel
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, blocks_for
from exegpt.models.loader import LoadedModel
from exegpt.models.runner import ModelRunner
from services.profiler.measure_layers import torch_threads
from services.profiler.probe import Steps
from services.profiler.timing import Timer, TimingStats, across_rounds

_BLOCK_SIZE_TOKENS = 16  # the engine's default

# (batch, prompt tokens) prefills and (batch, prompt tokens, cached tokens) decode steps:
# inside and between the quick grid's points, small and large.
PREFILL_POINTS = ((1, 16), (1, 200), (2, 512), (4, 64), (8, 128), (16, 32), (32, 48))
DECODE_POINTS = (
    (1, 32, 16),
    (4, 64, 100),
    (8, 128, 64),
    (16, 100, 300),
    (32, 64, 128),
    (64, 40, 24),
    (24, 256, 700),
)


@dataclass(frozen=True)
class ValidationPoint:
    kind: str  # "prefill" or "decode"
    batch_size: int
    prompt_tokens: int
    kv_len_tokens: int  # decode: tokens cached before the step; prefill: 0
    predicted_s: float
    extrapolated: bool  # the prediction used a point past the profile's grid
    measured: TimingStats

    @property
    def measured_s(self) -> float:
        return self.measured.median_s

    @property
    def relative_error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


def _layers_allreduce_s(cost: CostModel, num_layers: int, num_tokens: int, tp: int) -> float:
    """A TP layer all-reduces its activations twice (attention out, feed-forward out)."""
    if tp == 1:
        return 0.0
    num_bytes = num_tokens * cost.shape.hidden_bytes_per_token
    return num_layers * 2 * cost.allreduce_s(num_bytes, tp)


def predict_decode_step_s(
    cost: CostModel, batch: int, kv_len: int, cross_len: int, tp: int = 1
) -> float:
    """One decode step of the whole model for a batch."""
    num_layers = cost.shape.num_decode_layers
    per_layer = cost.decode_attention_s(batch, kv_len, cross_len, tp) + cost.decode_rest_s(
        batch, tp
    )
    return (
        cost.embedding_s(batch)
        + num_layers * per_layer
        + _layers_allreduce_s(cost, num_layers, batch, tp)
        + cost.lm_head_s(batch)
    )


def predict_prefill_s(cost: CostModel, batch: int, seq_len: int, tp: int = 1) -> float:
    """A prefill (encoder-decoder: encode plus the first decoder step) up to the first token."""
    shape = cost.shape
    num_tokens = batch * seq_len
    per_layer = cost.encode_attention_s(batch, seq_len, tp) + cost.encode_rest_s(num_tokens, tp)
    encode = (
        cost.embedding_s(num_tokens)
        + shape.num_encode_layers * per_layer
        + _layers_allreduce_s(cost, shape.num_encode_layers, num_tokens, tp)
    )
    if shape.is_encoder_decoder:
        return encode + predict_decode_step_s(cost, batch, 1, seq_len, tp)
    return encode + cost.lm_head_s(batch)


def _extrapolations(cost: CostModel) -> int:
    return int(getattr(cost, "num_extrapolated_queries", 0))


def _num_blocks(
    prefill_points: tuple[tuple[int, int], ...], decode_points: tuple[tuple[int, int, int], ...]
) -> int:
    size = _BLOCK_SIZE_TOKENS
    prefill = [b * (blocks_for(s, size) + 1) for b, s in prefill_points]
    decode = [b * (blocks_for(s, size) + blocks_for(kv + 1, size)) for b, s, kv in decode_points]
    return max([1, *prefill, *decode])


def validate_profile(
    cost: CostModel,
    loaded: LoadedModel,
    *,
    num_threads: int,
    prefill_points: tuple[tuple[int, int], ...] = PREFILL_POINTS,
    decode_points: tuple[tuple[int, int, int], ...] = DECODE_POINTS,
    num_warmup: int = 2,
    num_repeats: int = 3,
    num_rounds: int = 7,
    on_point: Callable[[ValidationPoint], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[ValidationPoint]:
    """Time whole prefills and decode steps and compare each with its prediction.

    Every point is measured once per round and the rounds run one after the other, so a
    slow spell of a shared machine affects one round of many points rather than every
    measurement of one point (see timing.across_rounds). `on_step(done, total)` follows
    the measurements; `on_point` gets each finished point.
    """
    configure_allocator()  # as the profile was taken (see allocator.py)
    context = loaded.config.max_context_tokens
    prefill_points = tuple(p for p in prefill_points if p[1] <= context)
    decode_points = tuple(p for p in decode_points if max(p[1], p[2] + 1) <= context)
    spec = KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype)
    pool = KVCachePool(
        spec, _num_blocks(prefill_points, decode_points), _BLOCK_SIZE_TOKENS, loaded.device
    )
    for layer in pool.layers:  # as in a serving engine, every page of the pool holds data
        layer.k.fill_(0.5)
        layer.v.fill_(0.5)
    steps = Steps(ModelRunner(loaded.model, pool), loaded.config)
    timer = Timer(loaded.device, num_warmup, num_repeats)
    rounds: dict[tuple[str, int, int, int], list[TimingStats]] = {}
    total = max(1, num_rounds) * (len(prefill_points) + len(decode_points))

    def done(key: tuple[str, int, int, int], stats: TimingStats) -> None:
        rounds.setdefault(key, []).append(stats)
        if on_step is not None:
            on_step(sum(len(r) for r in rounds.values()), total)

    with torch_threads(num_threads):
        for _ in range(max(1, num_rounds)):
            for batch, prompt in prefill_points:
                done(
                    ("prefill", batch, prompt, 0), timer.measure(steps.prefill_step(batch, prompt))
                )
            for batch, prompt, kv_len in decode_points:
                seqs = steps.decode_sequences(batch, kv_len, prompt)
                stats = timer.measure(steps.decode_step(seqs))
                steps.release(seqs)
                done(("decode", batch, prompt, kv_len), stats)
    results: list[ValidationPoint] = []
    for (kind, batch, prompt, kv_len), measured in rounds.items():
        if kind == "prefill":
            predicted = _predicted(cost, predict_prefill_s, batch, prompt)
        else:
            cross = prompt if loaded.config.is_encoder_decoder else 0
            predicted = _predicted(cost, predict_decode_step_s, batch, kv_len, cross)
        point = ValidationPoint(kind, batch, prompt, kv_len, *predicted, across_rounds(measured))
        results.append(point)
        if on_point is not None:
            on_point(point)
    return results


def _predicted(cost: CostModel, predict: Callable[..., float], *args: int) -> tuple[float, bool]:
    """(prediction, whether any query behind it left the measured grid)."""
    before = _extrapolations(cost)
    value = predict(cost, *args)
    return value, _extrapolations(cost) > before


def summarize(points: list[ValidationPoint]) -> tuple[float, float]:
    """(median, worst) absolute relative error."""
    errors = [abs(point.relative_error) for point in points]
    return statistics.median(errors), max(errors)


def format_table(points: list[ValidationPoint]) -> str:
    lines = [
        f"{'step':<8}{'batch':>6}{'prompt':>8}{'kv':>6}{'predicted ms':>14}"
        f"{'measured ms':>13}{'(p10-p90)':>18}{'error':>9}"
    ]
    for p in points:
        spread = f"{p.measured.p10_s * 1e3:.2f}-{p.measured.p90_s * 1e3:.2f}"
        flag = "  (extrapolated)" if p.extrapolated else ""
        lines.append(
            f"{p.kind:<8}{p.batch_size:>6}{p.prompt_tokens:>8}{p.kv_len_tokens:>6}"
            f"{p.predicted_s * 1e3:>14.3f}{p.measured_s * 1e3:>13.3f}{spread:>18}"
            f"{p.relative_error:>+9.1%}{flag}"
        )
    median, worst = summarize(points)
    lines.append(
        f"relative error: median {median:.1%}, worst {worst:.1%} over {len(points)} forwards"
    )
    inside = [p for p in points if not p.extrapolated]
    if inside and len(inside) < len(points):
        median, worst = summarize(inside)
        lines.append(
            f"inside the profile's grid: median {median:.1%}, worst {worst:.1%} over "
            f"{len(inside)} forwards ({len(points) - len(inside)} extrapolated)"
        )
    return "\n".join(lines)
