"""exegpt/commands/calibration_pass.py: engine-clock totals that took known multiples of what the
profile predicts give back those multiples, kind by kind, and a calibrated copy predicts
with them (hand-made totals on the analytic roofline profile)."""

from __future__ import annotations

import pytest

from exegpt.commands.calibration_pass import KindTotals, calibration_from_totals, totals_between
from services.scheduler.observations import StageKind
from services.scheduler.problem_builder import load_cost_model
from services.scheduler.simulate import workload_of
from services.scheduler.simulator.common import LayerCosts, WorkloadStats, prefill_parts

PROFILE = "analytic:a40:opt-13b"
ENCODER_DECODER = "analytic:a40:t5-11b"


def _steps_at_known_multiples() -> tuple[float, float]:
    """A prefill step of 4 requests whose layers took 2x the profile and a decode step of 8
    rows at 1.5x, on task S x0.25; the embedding and LM head ran as priced (they are not
    calibrated): their seconds."""
    model = load_cost_model(PROFILE).model
    workload = workload_of("task:S", 0.25, model.shape.max_context_tokens)
    costs = LayerCosts(model, WorkloadStats.from_workload(workload))
    shape = model.shape
    prefill_s = prefill_parts(costs, 4).outside_s + 2.0 * shape.num_encode_layers * sum(
        costs.encode(4, 1)
    )
    decode_s = costs.embedding_s(8) + costs.lm_head_s(8)
    decode_s += 1.5 * shape.num_decode_layers * sum(costs.decode(8, 1))
    return prefill_s, decode_s


def test_totals_that_took_known_multiples_calibrate_each_kind_by_its_own() -> None:
    prefill_s, decode_s = _steps_at_known_multiples()  # 5 prefill steps, 50 decode steps
    totals = {
        "prefill": KindTotals(5, 20, 5 * prefill_s, 0.01),
        "decode": KindTotals(50, 400, 50 * decode_s, 0.1),
    }
    calibration = calibration_from_totals(PROFILE, "task:S", 0.25, totals)
    assert calibration.factor(StageKind.ENCODE) == pytest.approx(2.0)
    assert calibration.factor(StageKind.DECODE) == pytest.approx(1.5)
    # The analytic profile prices no serving overhead: that kind stays uncalibrated.
    assert StageKind.OVERHEAD not in calibration.factors
    assert calibration.counts == {StageKind.ENCODE: 5, StageKind.DECODE: 50}


def test_overlapping_steps_are_priced_on_their_whole_compute() -> None:
    """A pipelined deployment's steps overlap (a WAA encode beside decode steps): the engine
    caps each step's forward at its share of the wall time, and only the stages' compute
    (compute_s) gives the factors; a worker without it (0) is read by its forward."""
    prefill_s, decode_s = _steps_at_known_multiples()
    totals = {  # forwards cut to a fifth and a half by the overlap
        "prefill": KindTotals(5, 20, prefill_s, 0.01, 5 * prefill_s),
        "decode": KindTotals(50, 400, 25 * decode_s, 0.1, 50 * decode_s),
    }
    calibration = calibration_from_totals(PROFILE, "task:S", 0.25, totals)
    assert calibration.factor(StageKind.ENCODE) == pytest.approx(2.0)
    assert calibration.factor(StageKind.DECODE) == pytest.approx(1.5)
    assert KindTotals(5, 20, 1.0, 0.0).work_s == 1.0  # no compute_s: the forward


def test_a_fractional_mean_batch_is_priced_between_its_whole_neighbours() -> None:
    model = load_cost_model(PROFILE).model
    workload = workload_of("task:G", 0.25, model.shape.max_context_tokens)
    costs = LayerCosts(model, WorkloadStats.from_workload(workload))
    shape = model.shape

    def prefill_s(rows: int) -> float:  # layers at 3x the profile, the rest as priced
        layers_s = 3.0 * shape.num_encode_layers * sum(costs.encode(rows, 1))
        return prefill_parts(costs, rows).outside_s + layers_s

    # Prefills of one and of two requests, 10 each (1.5 rows on average, as continuous
    # batching at long outputs admits): the ratio is 3, not skewed by rounding 1.5 to 2.
    totals = {"prefill": KindTotals(20, 30, 10 * prefill_s(1) + 10 * prefill_s(2), 0.01)}
    calibration = calibration_from_totals(PROFILE, "task:G", 0.25, totals)
    assert calibration.factor(StageKind.ENCODE) == pytest.approx(3.0)


@pytest.mark.parametrize("rows", [1, 256])
def test_an_encoder_decoder_prefill_s_first_decode_step_is_priced_at_the_decode_factor(
    rows: int,
) -> None:
    # A T5 prefill runs the encoder and then every decoder layer's first step: that step is
    # most of a prefill of one row and little of one of 256. Encoder layers at 2x the profile
    # and decoder layers at 1.5x read an encode factor of 2 at either size (priced without
    # the step, the factor would grow as the prefills shrink).
    model = load_cost_model(ENCODER_DECODER).model
    assert model.shape.is_encoder_decoder
    costs = LayerCosts(model, WorkloadStats.from_workload(workload_of("task:S", 0.25, 2048)))
    shape = model.shape
    parts = prefill_parts(costs, rows)
    assert parts.first_step_s == pytest.approx(
        shape.num_decode_layers * costs.first_step(rows, 1)[0]
    )
    assert parts.first_step_s > 0
    prefill_s = parts.outside_s + 2.0 * parts.encoder_s + 1.5 * parts.first_step_s
    decode_s = costs.embedding_s(8) + costs.lm_head_s(8)
    decode_s += 1.5 * shape.num_decode_layers * sum(costs.decode(8, 1))
    totals = {
        "prefill": KindTotals(10, 10 * rows, 10 * prefill_s, 0.01),
        "decode": KindTotals(50, 400, 50 * decode_s, 0.1),
    }
    calibration = calibration_from_totals(ENCODER_DECODER, "task:S", 0.25, totals)
    assert calibration.factor(StageKind.ENCODE) == pytest.approx(2.0)
    assert calibration.factor(StageKind.DECODE) == pytest.approx(1.5)


def test_totals_between_reads_the_pass_alone() -> None:
    before = {"decode": KindTotals(10, 40, 1.0, 0.5)}
    after = {"decode": KindTotals(30, 100, 4.0, 0.75), "prefill": KindTotals(3, 9, 0.3, 0.1)}
    delta = totals_between(before, after)
    assert delta["decode"] == KindTotals(20, 60, 3.0, 0.25)
    assert delta["prefill"] == KindTotals(3, 9, 0.3, 0.1)
