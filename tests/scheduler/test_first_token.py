"""Every kind counts a sequence's tokens as the engine makes them: the first comes with its
prefill (the encoding), so an output of S tokens decodes S - 1 steps (tests/scheduler/
toy_cost.py's cost model, computed by hand)."""

from __future__ import annotations

import math

import pytest

from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.problem import PlanProblem, WorkloadDistribution
from services.scheduler.simulator.predict import simulate
from services.scheduler.simulator.rra import completion_pmf, decode_steps_pmf
from tests.scheduler.toy_cost import ToyCostModel, decoder_only_shape, pmf


def two_token_problem(num_devices: int) -> PlanProblem:
    """Inputs of 10 tokens, outputs of exactly 2: one prefill (the first) and one decode step."""
    workload = WorkloadDistribution("two", pmf({10: 1.0}), pmf({2: 1.0}))
    model = ToyCostModel(decoder_only_shape())
    return PlanProblem(model, workload, math.inf, num_devices, 10**9)


def test_rra_decodes_one_step_for_a_two_token_output() -> None:
    schedule = Schedule(ScheduleKind.RRA, 4, 1, num_decode_iterations=1)
    prediction = simulate(two_token_problem(2), schedule)
    # Encode 40 tokens: 0.04 s on each one-layer stage + a 0.002 s hop. Each sequence decodes
    # one step, so it stays one cycle: B_D = 4, an iteration 2 x (0.01 + 0.004) + 0.002.
    encode_s, iteration_s = 0.082, 0.030
    assert prediction.schedule.decode_batch_size == 4
    assert prediction.throughput_seq_s == pytest.approx(4 / (encode_s + iteration_s))
    # Its encoding (the first token) and one iteration: not a second cycle.
    assert prediction.latency_s == pytest.approx(encode_s + iteration_s)


def test_waa_decodes_one_step_for_a_two_token_output() -> None:
    schedule = Schedule(ScheduleKind.WAA_C, 4, 1, num_micro_batches=1, num_encode_devices=1)
    prediction = simulate(two_token_problem(3), schedule)
    # The running cap holds the encoding in flight and the decoding rows: 4 x 2 = 8.
    assert prediction.schedule.decode_batch_size == 8
    # Encode device: both layers, 40 tokens, 0.08 s a batch (the cycle). Decode side: the 4
    # sequences of an encoding decode together, 2 x (0.01 + 0.004) + 0.002 s an iteration.
    assert prediction.throughput_seq_s == pytest.approx(4 / 0.08)
    # Encoding, the 0.002 s hand-over, and ONE decode iteration.
    assert prediction.latency_s == pytest.approx(0.08 + 0.002 + 0.030)


def test_static_and_continuous_decode_one_step_for_a_two_token_output() -> None:
    static = simulate(two_token_problem(2), Schedule(ScheduleKind.STATIC, 2, 2))
    # Two micro-batches of one through two stages: 0.01 + 0.002 + 0.01, then 0.01 more; one
    # decode iteration of both: max(2 x 0.011 + 0.002, 2 x 0.011).
    assert static.latency_s == pytest.approx(0.032 + 0.024)
    continuous = simulate(two_token_problem(2), Schedule(ScheduleKind.CONTINUOUS, 2, 2))
    # One row per micro-batch; every decode step frees it, so a 1-row prefill follows each.
    iteration_s = 2 * (0.011 + 0.01) + 0.002
    assert continuous.latency_s == pytest.approx(0.022 + iteration_s)


def test_rra_sizes_the_decode_batch_by_decode_steps() -> None:
    # Outputs of 2 (40%) or 3 (60%) tokens decode 1 or 2 steps: with N_D = 1 they stay 1 or
    # 2 cycles, E = 1.6, and they finish at iteration 1 of their last cycle.
    steps = decode_steps_pmf(pmf({2: 0.4, 3: 0.6}))
    assert steps == pytest.approx([0.0, 0.4, 0.6])
    assert completion_pmf(steps, 1) == pytest.approx([0.0, 1 / 1.6])
