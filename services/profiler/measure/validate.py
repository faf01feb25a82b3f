"""Check a profile against whole-model forwards: predicted vs measured time.

Predictions use only the `CostModel` interface, composed the way the profile documents
(exegpt/profile/layer_profile.py), so a small error here means the simulator gets sums it can
trust. Measurements run the engine's ModelRunner on the real model and KV pool, unsharded
(TP 1), with the thread count the profile was taken with.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from exegpt.allocator import configure_allocator
from exegpt.cost_model import CostModel, decode_layer_s, encode_layer_s
from exegpt.models.loader import LoadedModel
from exegpt.models.prepack import pack_linears
from services.profiler.measure.forwards import ForwardPoint, WholeForwards, decode, prefill
from services.profiler.measure.grid import SAMPLE_S
from services.profiler.measure.layers import torch_threads
from services.profiler.measure.timing import Timer, TimingStats, across_rounds

# Prefills (batch, prompt tokens) and decode steps (batch, prompt tokens, cached tokens)
# inside and between the quick grid's points, small and large.
VALIDATION_POINTS = (
    prefill(1, 16),
    prefill(1, 200),
    prefill(2, 512),
    prefill(4, 64),
    prefill(8, 128),
    prefill(16, 32),
    prefill(32, 48),
    decode(1, 32, 16),
    decode(4, 64, 100),
    decode(8, 128, 64),
    decode(16, 100, 300),
    decode(32, 64, 128),
    decode(64, 40, 24),
    decode(24, 256, 700),
)

VALIDATION_ROUNDS = 10  # about a minute for the default model on 2 cores


@dataclass(frozen=True)
class ValidationPoint:
    point: ForwardPoint
    predicted_s: float
    extrapolated: bool  # the prediction used a point past the profile's grid
    rounds: tuple[TimingStats, ...]  # each round's measurement, in order

    @property
    def measured(self) -> TimingStats:
        """Over all rounds (see timing.across_rounds)."""
        return across_rounds(list(self.rounds))

    @property
    def measured_s(self) -> float:
        return self.measured.median_s

    def halves_differ(self) -> float | None:
        """Second half of the rounds vs the first, relative (None with fewer than two)."""
        half = len(self.rounds) // 2
        if half == 0:
            return None
        first = statistics.median(r.median_s for r in self.rounds[:half])
        second = statistics.median(r.median_s for r in self.rounds[half:])
        return (second - first) / first

    @property
    def relative_error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


def predict_decode_step_s(
    cost: CostModel, batch: int, kv_len: int, cross_len: int, tp: int = 1
) -> float:
    """One decode step of the whole model for a batch."""
    layer = decode_layer_s(cost, batch, kv_len, cross_len, tp)
    return (
        cost.embedding_s(batch) + cost.shape.num_decode_layers * sum(layer) + cost.lm_head_s(batch)
    )


def predict_prefill_s(cost: CostModel, batch: int, seq_len: int, tp: int = 1) -> float:
    """A prefill (encoder-decoder: encode plus the first decoder step) up to the first token."""
    shape = cost.shape
    num_tokens = batch * seq_len
    layer = encode_layer_s(cost, batch, seq_len, num_tokens, tp)
    encode = cost.embedding_s(num_tokens) + shape.num_encode_layers * sum(layer)
    if shape.is_encoder_decoder:
        return encode + predict_decode_step_s(cost, batch, 1, seq_len, tp)
    return encode + cost.lm_head_s(batch)


def _extrapolations(cost: CostModel) -> int:
    return int(getattr(cost, "num_extrapolated_queries", 0))


def predict_forward_s(cost: CostModel, point: ForwardPoint) -> float:
    if point.kind == "prefill":
        return predict_prefill_s(cost, point.batch_size, point.prompt_tokens)
    cross = point.prompt_tokens if cost.shape.is_encoder_decoder else 0
    return predict_decode_step_s(cost, point.batch_size, point.kv_len_tokens, cross)


def validate_profile(
    cost: CostModel,
    loaded: LoadedModel,
    *,
    num_threads: int,
    points: tuple[ForwardPoint, ...] = VALIDATION_POINTS,
    num_warmup: int = 2,
    num_repeats: int = 3,
    num_rounds: int = VALIDATION_ROUNDS,
    on_point: Callable[[ValidationPoint], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[ValidationPoint]:
    """Time whole prefills and decode steps and compare each with its prediction.

    Every point is measured once per round and the rounds run one after the other, so a
    slow spell of a shared machine affects one round of many points rather than every
    measurement of one point (see timing.across_rounds). `on_step(done, total)` follows the
    measurements; `on_point` gets each finished point.
    """
    configure_allocator()  # as the profile was taken (see allocator.py)
    pack_linears(loaded.model)  # as the profile timed them and serving runs them
    forwards = WholeForwards(loaded, points)
    points = forwards.usable(points)
    timer = Timer(loaded.device, num_warmup, num_repeats, min_sample_s=SAMPLE_S)
    rounds: dict[ForwardPoint, list[TimingStats]] = {point: [] for point in points}
    num_rounds = max(1, num_rounds)
    num_done = 0
    with torch_threads(num_threads):
        for _ in range(num_rounds):
            for point in points:
                rounds[point].append(forwards.measure(timer, point))
                num_done += 1
                if on_step is not None:
                    on_step(num_done, num_rounds * len(points))
    results: list[ValidationPoint] = []
    for point in points:
        before = _extrapolations(cost)
        predicted = predict_forward_s(cost, point)
        extrapolated = _extrapolations(cost) > before
        result = ValidationPoint(point, predicted, extrapolated, tuple(rounds[point]))
        results.append(result)
        if on_point is not None:
            on_point(result)
    return results


def summarize(points: list[ValidationPoint]) -> tuple[float, float]:
    """(median, worst) absolute relative error."""
    errors = [abs(point.relative_error) for point in points]
    return statistics.median(errors), max(errors)


def repeatability(points: list[ValidationPoint]) -> tuple[float, float] | None:
    """(median, worst) relative difference between the two halves of the rounds: how well the
    machine reproduces its own measurements (None with fewer than two rounds)."""
    differences = [p.halves_differ() for p in points]
    magnitudes = [abs(d) for d in differences if d is not None]
    return (statistics.median(magnitudes), max(magnitudes)) if magnitudes else None


def common_shift(points: list[ValidationPoint]) -> tuple[float, float, float]:
    """(shift, median, worst): the median signed relative error, and the absolute errors left
    once every prediction is divided by 1 + shift.

    When a shared machine runs everything faster or slower than while it was profiled,
    every error moves the same way; the shift is that, and what is left around it is the
    profile's own shape error. A diagnosis, not a correction: the errors above are the ones
    a plan made now would see.
    """
    shift = statistics.median(p.relative_error for p in points)
    left = [abs((1 + p.relative_error) / (1 + shift) - 1) for p in points]
    return shift, statistics.median(left), max(left)


def format_table(points: list[ValidationPoint]) -> str:
    lines = [
        f"{'step':<8}{'batch':>6}{'prompt':>8}{'kv':>6}{'predicted ms':>14}"
        f"{'measured ms':>13}{'(p10-p90)':>18}{'error':>9}"
    ]
    for p in points:
        spread = f"{p.measured.p10_s * 1e3:.2f}-{p.measured.p90_s * 1e3:.2f}"
        flag = "  (extrapolated)" if p.extrapolated else ""
        lines.append(
            f"{p.point.kind:<8}{p.point.batch_size:>6}{p.point.prompt_tokens:>8}"
            f"{p.point.kv_len_tokens:>6}{p.predicted_s * 1e3:>14.3f}{p.measured_s * 1e3:>13.3f}"
            f"{spread:>18}{p.relative_error:>+9.1%}{flag}"
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
    shift, median, worst = common_shift(points)
    lines.append(
        f"the errors share a shift of {shift:+.1%} (this machine's speed now against while "
        f"it was profiled); around it: median {median:.1%}, worst {worst:.1%}"
    )
    halves = repeatability(points)
    if halves is not None:
        lines.append(
            f"the machine's own repeatability: the first and second half of the rounds differ "
            f"by median {halves[0]:.1%}, worst {halves[1]:.1%}"
        )
    return "\n".join(lines)
