"""The serving overhead in the XSimulator: each kind adds exactly the host work the cost model
carries, per step, per token and per request (hand-made costs: tests/scheduler/toy_cost.py),
and the fit that derives the terms from an engine's step totals."""

from __future__ import annotations

import math

import pytest

from exegpt.schedule import Schedule, ScheduleKind
from exegpt.serving_overhead import (
    NO_OVERHEAD,
    ServingOverhead,
    StepSample,
    fit_overhead,
    serving_overhead_of,
)
from services.scheduler.calibration import Calibration, ScaledCostModel
from services.scheduler.observations import StageKind
from services.scheduler.problem import PlanProblem
from services.scheduler.simulator.predict import simulate
from tests.scheduler.toy_cost import (
    ServedToyCostModel,
    ToyCostModel,
    decoder_only_shape,
    toy_workload,
)

MEAN_OUT, MAX_OUT = 2.6, 3  # toy outputs: 2 tokens (40%) or 3 (60%)
OVERHEAD = ServingOverhead(step_s=0.004, token_s=0.0005, request_s=0.002)


def problem(overhead: ServingOverhead, num_devices: int = 1) -> PlanProblem:
    model = ServedToyCostModel(decoder_only_shape(), serving_overhead=overhead)
    return PlanProblem(model, toy_workload(), math.inf, num_devices, 10**9)


def both(schedule: Schedule, overhead: ServingOverhead = OVERHEAD, num_devices: int = 1):
    bare = simulate(problem(NO_OVERHEAD, num_devices), schedule)
    served = simulate(problem(overhead, num_devices), schedule)
    return bare, served


def test_static_batch_pays_each_step_each_streamed_token_and_each_request() -> None:
    batch = 8
    bare, served = both(Schedule(ScheduleKind.STATIC, batch, batch))
    # One prefill step (each sequence's first token and its request), then E[max of 8
    # outputs] - 1 = 1 + (1 - 0.4^8) decode steps streaming the B x (mean - 1) other tokens.
    num_steps = 1 + (1 - 0.4**8)
    expected = (
        OVERHEAD.prefill_step_s(batch)
        + num_steps * OVERHEAD.step_s
        + OVERHEAD.token_s * batch * (MEAN_OUT - 1)
    )
    assert batch / served.throughput_seq_s - batch / bare.throughput_seq_s == pytest.approx(
        expected
    )
    # The p99-length (3-token) sequence: the prefill, then 2 steps beside 1 + 7 x 1.6 / 2 rows.
    p99_rows = 1 + (batch - 1) * (MEAN_OUT - 1) / (MAX_OUT - 1)
    expected_latency = OVERHEAD.prefill_step_s(batch) + (MAX_OUT - 1) * OVERHEAD.decode_step_s(
        p99_rows
    )
    assert served.latency_s - bare.latency_s == pytest.approx(expected_latency)


def test_continuous_iteration_pays_a_decode_step_and_its_share_of_a_prefill() -> None:
    running = 8
    schedule = Schedule(ScheduleKind.CONTINUOUS, 3, running)
    bare, served = both(schedule)
    # A sequence decodes MEAN_OUT - 1 steps (its first token comes with its prefill); a step
    # is followed by a prefill when one of its 8 rows finished, of the rows freed.
    decode_steps = MEAN_OUT - 1
    prefills = 1 - (1 - 1 / decode_steps) ** running
    prefill_rows = running / decode_steps / prefills
    expected = OVERHEAD.decode_step_s(running) + prefills * OVERHEAD.prefill_step_s(prefill_rows)

    def iteration_s(prediction) -> float:
        return running / (decode_steps * prediction.throughput_seq_s)

    assert iteration_s(served) - iteration_s(bare) == pytest.approx(expected)


def test_rra_cycle_pays_one_prefill_and_n_d_decode_steps() -> None:
    overhead = ServingOverhead(step_s=0.003)  # per step only: rows do not matter
    schedule = Schedule(ScheduleKind.RRA, 4, 4, num_decode_iterations=3)
    bare, served = both(schedule, overhead)
    cycle_bare, cycle_served = (4 / p.throughput_seq_s for p in (bare, served))
    assert cycle_served - cycle_bare == pytest.approx(overhead.step_s * (1 + 3))


def test_waa_decode_side_pays_per_micro_batch_step() -> None:
    overhead = ServingOverhead(step_s=0.003, token_s=0.001)
    schedule = Schedule(ScheduleKind.WAA_C, 4, 8, num_micro_batches=2, num_encode_devices=1)

    def run(with_overhead: ServingOverhead):
        # cheap encoding: the decode side's iteration sets the cycle
        model = ServedToyCostModel(
            decoder_only_shape(), encode_token_s=0.0001, serving_overhead=with_overhead
        )
        return simulate(PlanProblem(model, toy_workload(), math.inf, 2, 10**9), schedule)

    bare, served = run(NO_OVERHEAD), run(overhead)
    # The first token comes with the prefill: 4 x (2.6 - 1) = 6.4 rows decode, 2 micro-batches
    # of 3 (the running cap B_E x E[S_out] = 10 also holds the encoding in flight).
    assert served.schedule.decode_batch_size == 10
    micro_step_s = overhead.decode_step_s(3)
    cycle_bare, cycle_served = (4 / p.throughput_seq_s for p in (bare, served))
    assert cycle_served - cycle_bare == pytest.approx(2 * micro_step_s)
    # the p99 sequence: its prefill step (its first token), then S99 - 1 = 2 decode iterations
    expected_latency_s = overhead.prefill_step_s(4) + 2 * 2 * micro_step_s
    assert served.latency_s - bare.latency_s == pytest.approx(expected_latency_s)


def test_no_overhead_leaves_the_prediction_unchanged() -> None:
    schedule = Schedule(ScheduleKind.CONTINUOUS, 3, 8)
    bare, served = both(schedule, NO_OVERHEAD)
    assert served == bare


def test_a_view_of_a_served_model_keeps_its_overhead() -> None:
    base = ServedToyCostModel(decoder_only_shape(), serving_overhead=OVERHEAD)
    decode_slower = Calibration({StageKind.DECODE: 2.0})
    assert serving_overhead_of(ScaledCostModel(base, calibration=decode_slower)) == OVERHEAD
    assert serving_overhead_of(ToyCostModel(decoder_only_shape())) == NO_OVERHEAD


def test_negative_or_infinite_terms_are_refused() -> None:
    with pytest.raises(ValueError, match="token_s"):
        ServingOverhead(token_s=-1e-3)
    with pytest.raises(ValueError, match="step_s"):
        ServingOverhead(step_s=math.inf)


def test_fit_recovers_the_terms_from_step_totals() -> None:
    def sample(steps: int, rows: int, requests: int) -> StepSample:
        host_s = steps * 0.004 + rows * 0.0005 + requests * 0.002
        return StepSample(steps, rows, requests, host_s)

    # decode runs at two batch sizes, prefills of several requests each
    samples = [sample(100, 400, 0), sample(100, 1600, 0), sample(20, 80, 80), sample(5, 80, 80)]
    fitted = fit_overhead(samples)
    assert fitted.step_s == pytest.approx(0.004)
    assert fitted.token_s == pytest.approx(0.0005)
    assert fitted.request_s == pytest.approx(0.002)


def test_fit_drops_a_term_the_data_make_negative() -> None:
    # host time falls with rows: no per-token cost is supported, the rest is refitted
    samples = [StepSample(100, 100, 0, 0.5), StepSample(100, 400, 0, 0.4)]
    fitted = fit_overhead(samples)
    assert fitted.token_s == 0.0 and fitted.request_s == 0.0
    assert fitted.step_s > 0
    with pytest.raises(ValueError, match="no engine steps"):
        fit_overhead([StepSample(0, 0, 0, 0.0)])
