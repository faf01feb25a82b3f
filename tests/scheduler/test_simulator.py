"""XSimulator against hand-computed small cases (tests/scheduler/toy_cost.py's cost model)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from exegpt.cost_model import ModelShape
from exegpt.placement import Stage
from exegpt.schedule import Schedule, ScheduleKind
from exegpt.serving_overhead import ServingOverhead
from services.scheduler.analytic_cost import analytic_cost_model
from services.scheduler.problem import PlanProblem, WorkloadDistribution
from services.scheduler.simulator.baselines import expected_max_tokens, rows_beside
from services.scheduler.simulator.common import (
    KV_HEADROOM,
    LayerCosts,
    TimelineEvent,
)
from services.scheduler.simulator.continuous import steady_state
from services.scheduler.simulator.predict import Simulator, simulate, timeline
from services.scheduler.simulator.rra import (
    completion_pmf,
    decode_batch_size,
    iteration_batch_sizes,
)
from services.scheduler.simulator.waa import micro_batch_events, pipeline_period_s
from tests.scheduler.toy_cost import (
    ServedToyCostModel,
    ToyCostModel,
    decoder_only_shape,
    pmf,
    toy_workload,
)

# Output lengths 2 (40%) and 3 (60%): mean 2.6, E[S^2] 7.0, running position (7 + 2.6) / 5.2.
RUNNING_POSITION = (7.0 + 2.6) / 5.2
KV_TOKENS = 10 + RUNNING_POSITION  # decoder-only: prompt + generated so far


def toy_problem(num_devices: int = 2, memory_bytes: int = 10**9, **costs: float) -> PlanProblem:
    model = ToyCostModel(decoder_only_shape(), **costs)
    return PlanProblem(model, toy_workload(), math.inf, num_devices, memory_bytes)


def rra(encode_batch: int, iterations: int, **extra: int) -> Schedule:
    return Schedule(ScheduleKind.RRA, encode_batch, 1, num_decode_iterations=iterations, **extra)


# ---- P_D(U|S) and B_D --------------------------------------------------------------------------


def test_completion_pmf_follows_the_paper_formula() -> None:
    # Queries of D decode steps: D=2 <= N_D=2 stays one cycle, D=3 > N_D stays ceil(3/2)=2:
    # E[cycles] = 0.4 + 1.2 = 1.6. The batch holds them as 0.4/1.6 = 0.25 and 1.2/1.6 = 0.75.
    # D=2 finishes at U=2 (0.25); D=3 at U = 1 + (2 mod 2) = 1, in one of its 2 cycles
    # (0.75 / 2 = 0.375).
    steps = pmf({2: 0.4, 3: 0.6})
    by_iteration = completion_pmf(steps, 2)
    assert by_iteration == pytest.approx([0.0, 0.375, 0.25])
    assert decode_batch_size(7, steps, 2) == pytest.approx(11.2)
    assert iteration_batch_sizes(11.2, by_iteration) == pytest.approx([11.2, 7.0])


def test_decode_batch_follows_littles_law() -> None:
    # B_E=7 a cycle: 2.8 queries of D=2 stay 1 cycle, 4.2 of D=3 stay 2, so the batch holds
    # 2.8 + 8.4 = 11.2 and, at iteration 2, the 4.2 in their last cycle (U=1) have left.
    steps = pmf({2: 0.4, 3: 0.6})
    by_iteration = completion_pmf(steps, 2)
    assert decode_batch_size(7, steps, 2) == pytest.approx(2.8 * 1 + 4.2 * 2)
    assert iteration_batch_sizes(11.2, by_iteration)[1] == pytest.approx(11.2 - 4.2)


def test_completion_pmf_long_outputs_spread_over_cycles() -> None:
    # Cycles: D=1 -> 1, D=3 -> 2, D=5 -> 3; E = 0.2 + 1.0 + 0.9 = 2.1. All finish at U=1
    # (1 + (D-1) mod 2), each in one of its cycles: (0.2 + 0.5 + 0.3) / 2.1.
    by_iteration = completion_pmf(pmf({1: 0.2, 3: 0.5, 5: 0.3}), 2)
    assert by_iteration == pytest.approx([0.0, 1 / 2.1, 0.0])
    # N_D covering every length: each sequence finishes at U = D within one cycle.
    assert completion_pmf(pmf({1: 0.2, 3: 0.5, 5: 0.3}), 8)[1:6] == pytest.approx(
        [0.2, 0, 0.5, 0, 0.3]
    )


# ---- RRA ----------------------------------------------------------------------------------------


def test_rra_two_stage_cycle_matches_hand_computation() -> None:
    problem = toy_problem()
    prediction = simulate(problem, rra(7, 2))
    # Encode 70 tokens: 0.07 s per one-layer stage + 0.002 s hop. The first token comes with
    # it, so outputs of 2 or 3 tokens decode D = 1 or 2 steps, within one cycle of N_D = 2:
    # B_D = 7 x E[ceil(D/2)] = 7; iterations at B=7 and B=7 - 2.8 (D=1 finished) = 4.2 -> 4:
    # 2 x (0.01 + 0.001 B) + 0.002.
    encode_s, iteration_s = 0.142, [0.036, 0.030]
    cycle_s = encode_s + sum(iteration_s)
    assert prediction.feasible
    assert prediction.schedule.decode_batch_size == 7
    assert prediction.throughput_seq_s == pytest.approx(7 / cycle_s)
    assert prediction.throughput_tokens_s == pytest.approx(7 / cycle_s * 2.6)
    # p99 = 3 tokens: its encoding and 2 decode steps, the whole of its one cycle.
    assert prediction.latency_s == pytest.approx(encode_s + iteration_s[0] + iteration_s[1])
    busy_s = 0.07 + 0.017 + 0.014
    assert prediction.utilisation_per_device == pytest.approx((busy_s / cycle_s,) * 2)


def test_rra_memory_is_weights_plus_expected_kv() -> None:
    prediction = simulate(toy_problem(), rra(7, 1))  # B_D = 7 x E[ceil(D/1)] = 7 x 1.6
    kv_bytes = math.ceil(11.2 * KV_HEADROOM * 1 * KV_TOKENS * 10)  # B_D x layers x tokens x 10 B
    assert prediction.memory_bytes_per_device == (1000 + 500 + kv_bytes,) * 2


def test_rra_timeline_of_a_two_stage_pipeline() -> None:
    events = timeline(toy_problem(), rra(7, 2))
    expected = [
        (0, 0.0, 0.07, "encode"),
        (0, 0.142, 0.159, "decode"),
        (0, 0.178, 0.192, "decode"),
        (1, 0.07, 0.072, "transfer"),
        (1, 0.072, 0.142, "encode"),
        (1, 0.159, 0.161, "transfer"),
        (1, 0.161, 0.178, "decode"),
        (1, 0.192, 0.194, "transfer"),
        (1, 0.194, 0.208, "decode"),
    ]
    got = [(e.device, e.start_s, e.end_s, e.kind) for e in events]
    assert len(got) == len(expected)
    for (device, start, end, kind), want in zip(got, expected, strict=True):
        assert (device, kind) == (want[0], want[3])
        assert (start, end) == pytest.approx(want[1:3])


def test_rra_partial_tensor_parallelism_adds_allreduce() -> None:
    prediction = simulate(toy_problem(), rra(7, 2, tp_degree=2, num_tp_devices=2))
    # One TP stage holding both layers at half the compute, plus 2 all-reduces per layer.
    encode_s = 2 * 0.035 + 4 * 0.0005
    iteration_s = [2 * 0.0085 + 4 * 0.0005, 2 * 0.007 + 4 * 0.0005]  # B = 7, then 4
    cycle_s = encode_s + sum(iteration_s)
    assert prediction.throughput_seq_s == pytest.approx(7 / cycle_s)
    kinds = {e.kind for e in timeline(toy_problem(), prediction.schedule)}
    assert kinds == {"encode", "decode", "allreduce"}  # one stage: no transfers


# ---- WAA ----------------------------------------------------------------------------------------


def waa(encode_batch: int, micro_batches: int, encode_devices: int) -> Schedule:
    return Schedule(
        ScheduleKind.WAA_C,
        encode_batch,
        1,
        num_micro_batches=micro_batches,
        num_encode_devices=encode_devices,
    )


def test_waa_batch_period_latency_and_second_weight_copy() -> None:
    prediction = simulate(toy_problem(num_devices=3), waa(4, 2, 1))
    assert prediction.schedule.decode_batch_size == 10  # B_E x mean output = 10.4
    # Encode device: both layers, 40 tokens -> 0.08 s a batch. The first token comes with the
    # encoding, so a sequence decodes 1.6 steps: 4 x 1.6 = 6.4 rows decode at the cap (the
    # running cap 10.4 also holds the encoding in flight). Decode devices: one layer each,
    # micro-batches of 3: 0.013 s; iteration max(0.013 + 0.002 + 0.013, 2 x 0.013) = 0.028.
    cycle_s = 0.08
    assert prediction.throughput_seq_s == pytest.approx(4 / cycle_s)
    # Encoding is the slower side: the decode batch settles where B = 50/s x 1.6 steps x
    # iteration(B) (Little's law): 80 x 0.028 = 2.24, below the 4 an encoding hands over at
    # once, so 4: micro-batches of 2, iteration 2 x 0.012 + 0.002 = 0.026 (80 x 0.026 is
    # still below 4). The p99 sequence's 2 decode steps take one such iteration each.
    assert prediction.latency_s == pytest.approx(0.08 + 0.002 + 2 * 0.026)
    encode_memory = 2 * 1000 + 500 + 40 * 2 * 10  # a full copy of the layers + prefill KV
    decode_kv = math.ceil(10.4 * KV_HEADROOM * KV_TOKENS * 10)
    assert prediction.memory_bytes_per_device == (
        encode_memory,
        1000 + 500 + decode_kv,
        1000 + 500 + decode_kv,
    )
    assert prediction.utilisation_per_device == pytest.approx((1.0, 0.325, 0.325))


def test_micro_batches_reproduce_the_papers_figure() -> None:
    # Three decode stages; two tokens take 6 stage-times without micro-batches, 2 2/3 with
    # three (plus the encoding's one: the paper's 7 and 3 2/3).
    stages = [Stage((d,), 1, 0, 1) for d in range(3)]
    whole: list[TimelineEvent] = []
    micro_batch_events(stages, [(1.0, 0.0)] * 3, 0.0, 1, 2, 0.0, whole)
    split: list[TimelineEvent] = []
    micro_batch_events(stages, [(1 / 3, 0.0)] * 3, 0.0, 3, 2, 0.0, split)
    assert max(e.end_s for e in whole) == pytest.approx(6.0)
    assert max(e.end_s for e in split) == pytest.approx(8 / 3)
    assert pipeline_period_s([(1.0, 0.0)] * 3, 0.0, 1) == pytest.approx(3.0)
    assert pipeline_period_s([(1 / 3, 0.0)] * 3, 0.0, 3) == pytest.approx(1.0)


# ---- baselines ----------------------------------------------------------------------------------


def test_expected_max_is_the_order_statistic_of_the_output_lengths() -> None:
    # Two draws of 1 or 2 (even odds): the max is 1 only when both are 1 (1/4), so 1.75.
    assert expected_max_tokens(pmf({1: 0.5, 2: 0.5}), 2) == pytest.approx(1.75)
    # Three draws of 1 (20%), 3 (50%) or 5 (30%): P(max <= 1) = 0.2^3 = 0.008, P(max <= 3) =
    # 0.7^3 = 0.343, so E[max] = 1 x 0.008 + 3 x 0.335 + 5 x 0.657 = 4.298.
    skewed = pmf({1: 0.2, 3: 0.5, 5: 0.3})
    assert expected_max_tokens(skewed, 3) == pytest.approx(4.298)
    assert expected_max_tokens(skewed, 1) == pytest.approx(3.2)  # one draw: the mean
    # A sequence of 3 tokens in a batch of 4 of {2: 40%, 3: 60%} decodes its tokens 2 and 3
    # (the first comes with the prefill): the other 3 all run at token 2 and 60% of them at
    # token 3, so 1 + 3 x (1 + 0.6) / 2 = 3.4 rows on average.
    assert rows_beside(pmf({2: 0.4, 3: 0.6}), 3, 4) == pytest.approx(3.4)
    assert rows_beside(pmf({2: 0.4, 3: 0.6}), 1, 4) == 4.0  # no decode step: the prefill's rows


def test_static_baseline_runs_until_its_longest_member_finishes() -> None:
    schedule = Schedule(ScheduleKind.STATIC, 4, 4)
    prediction = simulate(toy_problem(), schedule)
    # Two stages, so two micro-batches of 2 (FasterTransformer's pipeline split). Encode: 20
    # tokens a stage = 0.02 s; the first micro-batch takes 0.02 + 0.002 + 0.02, the second
    # follows one stage later. The first tokens come with the prefill, so the batch decodes
    # E[max of 4] - 1 = 1 + (1 - 0.4^4) steps; its rows, 2 x (2.6 - 1) a micro-batch over
    # them, are 1.62 a step on average, so a stage takes 0.01 + 0.001 x 1.62 and an
    # iteration of both micro-batches 2 stages + one 0.002 hop.
    num_steps = 1 + (1 - 0.4**4)
    rows = 2 * 1.6 / num_steps
    iteration_s = 2 * (0.01 + 0.001 * rows) + 0.002
    encode_s = 0.042 + 0.02
    batch_s = encode_s + num_steps * iteration_s
    assert prediction.throughput_seq_s == pytest.approx(4 / batch_s)
    assert prediction.throughput_tokens_s == pytest.approx(4 * 2.6 / batch_s)
    # The p99-length (3-token) sequence decodes 2 steps beside 1 + (2 - 1) x (1 + 0.6) / 2
    # rows on average.
    p99_iteration_s = 2 * (0.01 + 0.001 * 1.8) + 0.002
    assert prediction.latency_s == pytest.approx(encode_s + 2 * p99_iteration_s)
    # KV reserved for the maximum input + output (13 tokens) of all 4 sequences.
    assert prediction.memory_bytes_per_device == (1000 + 500 + 4 * 13 * 10,) * 2
    events = timeline(toy_problem(), schedule)
    assert max(e.end_s for e in events) == pytest.approx(encode_s + 2 * iteration_s)
    encodes = sorted((e.device, e.start_s) for e in events if e.kind == "encode")
    assert [device for device, _ in encodes] == [0, 0, 1, 1]
    assert [start for _, start in encodes] == pytest.approx([0.0, 0.02, 0.022, 0.042])
    assert sum(e.kind == "decode" for e in events) == 2 * 2 * 2  # steps x micro x stages


def test_static_baseline_with_full_tensor_parallelism_has_one_stage() -> None:
    schedule = Schedule(ScheduleKind.STATIC, 4, 4, tp_degree=2, num_tp_devices=2)
    prediction = simulate(toy_problem(), schedule)
    # One TP stage holding both layers: compute halved, 2 all-reduces of 0.0005 s per layer.
    # One micro-batch of 4: the p99 (3-token) sequence decodes 2 steps beside
    # 1 + 3 x (1 + 0.6) / 2 = 3.4 rows.
    encode_s = 2 * (40 * 0.001 / 2 + 2 * 0.0005)
    iteration_s = 2 * ((0.01 + 0.001 * 3.4) / 2 + 2 * 0.0005)
    assert prediction.latency_s == pytest.approx(encode_s + 2 * iteration_s)
    kv_bytes = 4 * 13 * 2 * 5  # 4 sequences x 13 tokens x 2 layers x 5 bytes (half the heads)
    assert prediction.memory_bytes_per_device == (2 * 500 + 500 + kv_bytes,) * 2


def test_continuous_baseline_keeps_a_batch_per_stage_in_flight() -> None:
    prediction = simulate(
        toy_problem(), Schedule(ScheduleKind.CONTINUOUS, 1, 4, num_micro_batches=2)
    )
    # Per virtual engine (2 rows): a sequence decodes m = 2.6 - 1 = 1.6 steps (its first
    # token comes with its prefill), so 2 / 1.6 = 1.25 are admitted per iteration, in
    # q = 1 - (1 - 1 / 1.6)^2 prefills of 1.25 / q rows (10 tokens each, 0.001 s a token).
    decode_steps = 1.6
    prefills = 1 - (1 - 1 / decode_steps) ** 2
    prefill_rows = 2 / decode_steps / prefills
    prefill_stage_s = prefill_rows * 10 * 0.001
    stage_s = 0.012 + prefills * prefill_stage_s
    iteration_s = max(2 * stage_s + 0.002, 2 * stage_s)
    assert prediction.throughput_seq_s == pytest.approx(4 / (decode_steps * iteration_s))
    # The p99 (3-token) sequence: its prefill through both stages, then 2 iterations.
    prefill_s = 2 * prefill_stage_s + 0.002
    assert prediction.latency_s == pytest.approx(prefill_s + 2 * iteration_s)


def test_continuous_prefill_of_an_encoder_decoder_broadcasts_the_encoder_output() -> None:
    # The case above on an encoder-decoder shape: each of the 2 stages holds one encoder and
    # one decoder layer, so the stage times are the same but for the prefill's first decode
    # step, which each stage's decoder layer adds to it (0.01 + 0.001 a row), with a hop of
    # its own into stage 1 (0.002); the p99 sequence's prefill also sends the encoder output
    # to every stage's cross-attention (one 0.002 s hop).
    shape = ModelShape("toy-t5", True, 2, 2, 8, 2, 1024)
    problem = PlanProblem(ToyCostModel(shape), toy_workload(), math.inf, 2, 10**9)
    prediction = simulate(problem, Schedule(ScheduleKind.CONTINUOUS, 1, 4, num_micro_batches=2))
    decode_steps = 1.6
    prefills = 1 - (1 - 1 / decode_steps) ** 2
    prefill_rows = 2 / decode_steps / prefills
    prefill_stage_s = prefill_rows * 10 * 0.001 + (0.01 + 0.001 * prefill_rows)
    iteration_s = 2 * (0.012 + prefills * prefill_stage_s) + prefills * 0.002 + 0.002
    assert prediction.throughput_seq_s == pytest.approx(4 / (decode_steps * iteration_s))
    # The hop between stages, the first token's hop, the broadcast.
    prefill_s = 2 * prefill_stage_s + 0.002 + 0.002 + 0.002
    assert prediction.latency_s == pytest.approx(prefill_s + 2 * iteration_s)
    # On one stage (both layers of each kind, 4 rows) nothing is broadcast: a prefill of
    # r = 2.5 / q rows, q = 1 - (1 - 1 / 1.6)^4 (r x 10 tokens x 2 layers x 0.001 s, and 2
    # decoder layers' first step, 0.01 + 0.001 r each), then 2 iterations of a decode step
    # (2 x 0.014) and q such prefills.
    one = simulate(replace(problem, num_devices=1), Schedule(ScheduleKind.CONTINUOUS, 1, 4))
    q = 1 - (1 - 1 / decode_steps) ** 4
    rows = 2.5 / q
    prefill_s = rows * 10 * 2 * 0.001 + 2 * (0.01 + 0.001 * rows)
    assert one.latency_s == pytest.approx(prefill_s + 2 * (0.028 + q * prefill_s))


def test_continuous_prefills_come_as_slots_free() -> None:
    # Outputs of exactly 11 tokens: each sequence decodes 10 steps, so a step of 8 rows
    # frees 0.8 slots on average and is followed by a prefill only when one finished,
    # 1 - 0.9^8 of the time, each admitting 0.8 / (1 - 0.9^8) sequences.
    workload = WorkloadDistribution("fixed", pmf({10: 1.0}), pmf({11: 1.0}))
    problem = PlanProblem(ToyCostModel(decoder_only_shape()), workload, math.inf, 1, 10**9)
    steady = steady_state(Simulator(problem).costs, 8, 1)
    assert steady.decode_steps == pytest.approx(10.0)
    assert steady.prefills == pytest.approx(1 - 0.9**8)
    assert steady.prefill_rows == pytest.approx(0.8 / (1 - 0.9**8))
    assert steady.admitted == pytest.approx(0.8)
    # Half the rows per micro-batch on 2 stages: fewer prefills, of fewer rows each.
    halves = steady_state(Simulator(problem).costs, 8, 2)
    assert halves.prefills == pytest.approx(1 - 0.9**4)
    assert halves.admitted == pytest.approx(0.4)


def test_continuous_prices_a_fixed_prefill_cost_per_prefill_step() -> None:
    # A prefill step's fixed host cost (0.05 s) is paid by the q prefill steps of an
    # iteration, not once per admitted sequence: 8 rows of 11-token outputs, 1 device.
    workload = WorkloadDistribution("fixed", pmf({10: 1.0}), pmf({11: 1.0}))
    schedule = Schedule(ScheduleKind.CONTINUOUS, 1, 8)

    def iteration_s(step_s: float) -> float:
        model = ServedToyCostModel(decoder_only_shape(), serving_overhead=ServingOverhead(step_s))
        problem = PlanProblem(model, workload, math.inf, 1, 10**9)
        return 8 / (10 * simulate(problem, schedule).throughput_seq_s)

    # Two layers on one stage: decode 2 x (0.01 + 0.008), prefill 2 x 10 tokens x 0.001 per row.
    prefills, rows = 1 - 0.9**8, 0.8 / (1 - 0.9**8)
    assert iteration_s(0.0) == pytest.approx(2 * 0.018 + prefills * rows * 0.02)
    # The overhead: one step_s for the decode step, q for the prefills.
    assert iteration_s(0.05) - iteration_s(0.0) == pytest.approx(0.05 * (1 + prefills))


# ---- feasibility, validation, sanity ------------------------------------------------------------


def test_memory_shortfall_is_infeasible_with_a_reason() -> None:
    needed = max(simulate(toy_problem(), rra(7, 2)).memory_bytes_per_device)
    short = simulate(toy_problem(memory_bytes=needed - 1), rra(7, 2))
    assert not short.feasible
    assert "device" in short.reason and "capacity" in short.reason
    assert short.throughput_seq_s > 0  # still computed, never clipped to fit
    assert simulate(toy_problem(memory_bytes=needed), rra(7, 2)).feasible


def test_invalid_schedules_raise() -> None:
    problem = toy_problem(num_devices=4)
    with pytest.raises(ValueError, match="TP degree 4"):
        simulate(problem, rra(4, 2, tp_degree=4, num_tp_devices=4))
    with pytest.raises(ValueError, match="encode devices"):
        simulate(problem, waa(4, 1, 0))
    with pytest.raises(ValueError, match="TP devices"):
        simulate(toy_problem(num_devices=1), rra(4, 2, tp_degree=2, num_tp_devices=2))


@pytest.fixture(scope="module")
def opt_simulator() -> Simulator:
    problem = PlanProblem(
        analytic_cost_model("a40:opt-13b"),
        WorkloadDistribution.from_task("T"),
        math.inf,
        4,
        48 * 1024**3,
    )
    return Simulator(problem)


def test_rra_is_monotonic_in_the_encode_batch(opt_simulator: Simulator) -> None:
    points = [opt_simulator.simulate(rra(b, 8)) for b in (1, 2, 4, 8, 16, 32)]
    throughputs = [p.throughput_seq_s for p in points]
    latencies = [p.latency_s for p in points]
    memory = [max(p.memory_bytes_per_device) for p in points]
    assert throughputs == sorted(throughputs)
    assert latencies == sorted(latencies)
    assert memory == sorted(memory)


def test_rra_encoding_more_often_trades_latency_for_throughput(opt_simulator: Simulator) -> None:
    frequent, rare = opt_simulator.simulate(rra(16, 2)), opt_simulator.simulate(rra(16, 64))
    assert frequent.throughput_seq_s > rare.throughput_seq_s
    assert frequent.latency_s > rare.latency_s


def test_simulation_is_deterministic(opt_simulator: Simulator) -> None:
    schedule = Schedule(ScheduleKind.WAA_M, 2, 1, num_micro_batches=2, num_encode_devices=1)
    assert opt_simulator.simulate(schedule) == Simulator(opt_simulator.problem).simulate(schedule)


def test_layer_costs_use_the_expected_workload() -> None:
    costs = LayerCosts(ToyCostModel(decoder_only_shape()), Simulator(toy_problem()).stats)
    assert costs.kv_lengths() == (round(KV_TOKENS), 0)
    stats = Simulator(toy_problem()).stats
    assert stats.running_position_tokens == pytest.approx(RUNNING_POSITION)
    assert stats.attention_input_tokens == 10
    assert np.isclose(stats.mean_output_tokens, 2.6)
