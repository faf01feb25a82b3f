"""XSimulator, hand-computed: encoder-decoder RRA, WAA with partial TP, the WAA timeline, and
how WAA-C and WAA-M split the devices (tests/scheduler/toy_cost.py's cost model)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from exegpt.cost_model import ModelShape
from exegpt.placement import split_layers
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.problem import PlanProblem
from services.scheduler.search.plan import SearchSpace, plan
from services.scheduler.simulator.common import (
    KV_HEADROOM,
    TimelineEvent,
)
from services.scheduler.simulator.predict import Simulator, simulate, timeline
from services.scheduler.simulator.waa import split_candidates
from tests.scheduler.toy_cost import ToyCostModel, decoder_only_shape, toy_workload

# Outputs of 2 (40%) or 3 (60%) tokens: a running sequence is at (E[S^2] + E[S]) / (2 E[S]).
RUNNING_POSITION = (7.0 + 2.6) / 5.2


def encoder_decoder_problem(num_devices: int = 2) -> PlanProblem:
    shape = ModelShape("toy-t5", True, 2, 2, 8, 2, 1024)
    return PlanProblem(ToyCostModel(shape), toy_workload(), math.inf, num_devices, 10**9)


def decoder_only_problem(
    num_devices: int, memory_bytes: int = 10**9, **costs: float
) -> PlanProblem:
    model = ToyCostModel(decoder_only_shape(), **costs)
    return PlanProblem(model, toy_workload(), math.inf, num_devices, memory_bytes)


def _no_overlap(events: list[TimelineEvent], device: int, kinds: tuple[str, ...]) -> bool:
    spans = sorted((e.start_s, e.end_s) for e in events if e.device == device and e.kind in kinds)
    return all(end <= start + 1e-12 for (_, end), (start, _) in itertools.pairwise(spans))


# ---- RRA on an encoder-decoder model ------------------------------------------------------------


def test_encoder_decoder_rra_broadcasts_the_encoder_output_and_keeps_cross_kv() -> None:
    problem = encoder_decoder_problem()
    schedule = Schedule(ScheduleKind.RRA, 7, 1, num_decode_iterations=2)
    prediction = simulate(problem, schedule)
    # Each stage holds one encoder and one decoder layer. Encode 70 tokens with the first
    # token's decode step of 7 rows on each stage's decoder layer (0.07 + 0.017), a 0.002 hop,
    # the same on stage 1 with the first token's own hop into it (0.002), then the encoder
    # output goes to stage 0's cross-attention (0.002).
    encode_s = 0.087 + 0.002 + 0.089 + 0.002
    # The first token comes with the encoding: 1 or 2 decode steps, one cycle of N_D = 2.
    iteration_s = [0.017 + 0.002 + 0.017, 0.014 + 0.002 + 0.014]  # B_D = 7, then 4
    cycle_s = encode_s + sum(iteration_s)
    assert prediction.schedule.decode_batch_size == 7
    assert prediction.throughput_seq_s == pytest.approx(7 / cycle_s)
    assert prediction.latency_s == pytest.approx(encode_s + iteration_s[0] + iteration_s[1])
    # Weights: an encoder and a decoder layer (1000 each) + the embedding (first and last
    # stage). KV per sequence per layer: self at the running position + cross over the input.
    per_sequence = RUNNING_POSITION * 10 + 10 * 10
    kv_bytes = math.ceil(7 * KV_HEADROOM * 1 * per_sequence)
    assert prediction.memory_bytes_per_device == (2000 + 500 + kv_bytes,) * 2
    broadcast = [e for e in timeline(problem, schedule) if e.label == "encoder output"]
    assert [(e.device, e.start_s, e.end_s) for e in broadcast] == [
        (0, pytest.approx(0.178), pytest.approx(0.180))
    ]


# ---- WAA ----------------------------------------------------------------------------------------


def waa(encode_batch: int, micro_batches: int, encode_devices: int, **extra: int) -> Schedule:
    return Schedule(
        ScheduleKind.WAA_C,
        encode_batch,
        1,
        num_micro_batches=micro_batches,
        num_encode_devices=encode_devices,
        **extra,
    )


def test_waa_partial_tensor_parallelism_on_the_decode_side() -> None:
    problem = decoder_only_problem(3)
    prediction = simulate(problem, waa(4, 1, 1, tp_degree=2, num_tp_devices=2))
    # Devices 1-2 form one TP stage with both layers: at the cap 4 x 1.6 = 6.4 rows decode
    # (the first token comes with the encoding), (0.01 + 0.001 x 6) / 2 per layer plus two
    # all-reduces of 0.0005; the encode device needs 0.08 s a batch and sets the cycle.
    decode_stage_s = 2 * (0.016 / 2) + 2 * 2 * 0.0005
    cycle_s = 0.08
    assert prediction.throughput_seq_s == pytest.approx(4 / cycle_s)
    # The decode batch settles where B = 50/s x 1.6 steps x iteration(B): 80 x 0.018 = 1.44,
    # below the 4 sequences an encoding hands over at once, so 4 (0.016 s, and 80 x 0.016 =
    # 1.28 is still below 4). The p99 sequence's 2 decode steps take 0.016 s each.
    assert decode_stage_s == pytest.approx(0.01 + 0.001 * 6 + 0.002)
    assert prediction.latency_s == pytest.approx(0.08 + 0.002 + 2 * 0.016)
    kv_bytes = math.ceil(10.4 * KV_HEADROOM * 2 * (10 + RUNNING_POSITION) * 5)  # half the heads
    assert prediction.memory_bytes_per_device == (
        2 * 1000 + 500 + 40 * 2 * 10,  # a full copy of the layers + the prefill KV in flight
        2 * 500 + 500 + kv_bytes,
        2 * 500 + 500 + kv_bytes,
    )
    assert prediction.utilisation_per_device == pytest.approx(
        (1.0, decode_stage_s / cycle_s, decode_stage_s / cycle_s)
    )
    kinds = {e.kind for e in timeline(problem, prediction.schedule) if e.device == 1}
    assert kinds == {"decode", "allreduce", "transfer"}


def test_waa_of_an_encoder_decoder_makes_the_first_token_on_the_decode_side() -> None:
    prediction = simulate(encoder_decoder_problem(2), waa(4, 1, 1))
    # Device 0 encodes 4 x 10 tokens over 2 layers (0.08 s a batch, the cycle); device 1
    # holds both decoder layers: at the cap 6 rows decode (2 x 0.016 a step), and each
    # handed-over batch of 4 gets its first token from a pass of those layers (2 x 0.014):
    # 0.060 of each 0.08 s cycle.
    first_pass_s = 2 * (0.01 + 0.001 * 4)
    cycle_s = 0.08
    assert prediction.throughput_seq_s == pytest.approx(4 / cycle_s)
    # The pass takes 0.028 of every cycle from the iterations: a running sequence's step
    # lasts 0.08 / 0.052 times an iteration. At 50 sequences/s x 1.6 steps the batch settles
    # at the 4 an encoding hands over (2 x 0.014 an iteration).
    token_s = 2 * 0.014 * cycle_s / (cycle_s - first_pass_s)
    assert prediction.latency_s == pytest.approx(0.08 + 0.002 + first_pass_s + 2 * token_s)
    assert prediction.utilisation_per_device == pytest.approx(
        (1.0, (2 * 0.016 + first_pass_s) / cycle_s)
    )


def test_waa_timeline_shows_steady_state_cycles() -> None:
    problem = decoder_only_problem(3)
    events = timeline(problem, waa(4, 2, 1))
    cycle_s = 0.08  # the encode device's batch time (see test_simulator's WAA case)
    encodes = [e for e in events if e.kind == "encode"]
    assert {e.device for e in encodes} == {0}
    assert [e.start_s for e in encodes] == pytest.approx([0.0, 0.08, 0.16])
    assert all(e.duration_s == pytest.approx(0.08) for e in encodes)
    for device in (1, 2):
        decodes = [e for e in events if e.device == device and e.kind == "decode"]
        assert len(decodes) == 3 * 2  # a token per cycle for each of the two micro-batches
        assert all(e.duration_s == pytest.approx(0.013) for e in decodes)  # micro-batches of 3
        handovers = [e for e in events if e.device == device and e.label.startswith("hand-over")]
        assert [e.start_s for e in handovers] == pytest.approx([0.0, cycle_s, 2 * cycle_s])
        assert _no_overlap(events, device, ("decode",))
    assert max(e.end_s for e in events) == pytest.approx(3 * cycle_s)


def test_waa_more_micro_batches_than_sequences_is_infeasible() -> None:
    prediction = simulate(decoder_only_problem(3), waa(1, 4, 1))  # 1.6 rows decode
    assert not prediction.feasible and "micro-batches" in prediction.reason


def test_waa_memory_shortfall_is_reported_not_clipped() -> None:
    fits = simulate(decoder_only_problem(3), waa(4, 1, 1))
    need = max(fits.memory_bytes_per_device)
    short = simulate(decoder_only_problem(3, memory_bytes=need - 1), waa(4, 1, 1))
    assert not short.feasible and "device 0" in short.reason
    assert short.throughput_seq_s == fits.throughput_seq_s
    assert short.memory_bytes_per_device == fits.memory_bytes_per_device


def test_waa_c_splits_devices_by_compute_time() -> None:
    # C_E / (C_E + C_D) of one cycle's work at B_E = 1, 8, 64; the floor and ceiling of N x
    # that share. Encode-heavy: 0.01 s a token -> shares 3.5, 3.9, 4.0 of 4 -> 3 (at most N-1).
    heavy_encode = Simulator(decoder_only_problem(4, encode_token_s=0.01))
    assert split_candidates(heavy_encode.costs, ScheduleKind.WAA_C, 4, 10**9) == [3]
    # Decode-heavy: 1 s a step. B_E = 64: encode 1.28 s, decode 2 x (1 + 0.001 x 166) s,
    # share 4 x 1.28 / 3.612 = 1.42 -> 1 and 2; smaller B_E give shares below 1 -> 1.
    heavy_decode = Simulator(decoder_only_problem(4, decode_fixed_s=1.0))
    assert split_candidates(heavy_decode.costs, ScheduleKind.WAA_C, 4, 10**9) == [1, 2]


def test_waa_m_gives_encoding_the_fewest_devices_that_hold_its_weights() -> None:
    costs = Simulator(decoder_only_problem(4)).costs
    # Encode weights: 2 layers x 1000 + 500 bytes of embedding.
    assert split_candidates(costs, ScheduleKind.WAA_M, 4, 10**9) == [1]
    assert split_candidates(costs, ScheduleKind.WAA_M, 4, 1250) == [2]
    assert split_candidates(costs, ScheduleKind.WAA_M, 4, 1000) == [3]
    assert split_candidates(costs, ScheduleKind.WAA_M, 1, 10**9) == []


# ---- layer split --------------------------------------------------------------------------------


def test_layers_balance_stage_times_but_every_stage_holds_one() -> None:
    assert split_layers(4, [1.0, 1.0]) == [2, 2]
    assert split_layers(5, [1.0, 1.0, 1.0]) == [2, 2, 1]  # remainder at the front
    assert split_layers(6, [2.0, 1.0]) == [2, 4]  # 4 s each
    assert split_layers(4, [10.0, 1.0, 1.0]) == [1, 2, 1]  # a slow stage still gets one
    assert split_layers(2, [1.0, 1.0, 1.0]) == [1, 1, 0]  # too few layers: one stays empty


def test_a_slow_tensor_parallel_group_still_holds_a_layer() -> None:
    # All-reduces so slow that the TP pair would rather hold nothing: it keeps one layer, so
    # "TP=2x1" means what it says (devices 0-1 work), instead of two idle devices.
    problem = decoder_only_problem(3, allreduce_fixed_s=1.0)
    schedule = Schedule(
        ScheduleKind.RRA, 4, 1, num_decode_iterations=2, tp_degree=2, num_tp_devices=2
    )
    prediction = simulate(problem, schedule)
    assert prediction.feasible
    busy = {e.device for e in timeline(problem, schedule) if e.kind in ("encode", "decode")}
    assert busy == {0, 1, 2}


def test_more_stages_than_layers_is_infeasible_and_not_searched() -> None:
    problem = replace(decoder_only_problem(3), kinds=(ScheduleKind.RRA,))  # 2 layers
    prediction = simulate(problem, Schedule(ScheduleKind.RRA, 4, 1, num_decode_iterations=2))
    assert not prediction.feasible and "device 2 holds none" in prediction.reason
    result = plan(problem, space=SearchSpace(max_encode_batch_size=8))
    assert result.chosen is not None
    rra = [p.schedule for p in result.evaluated if p.schedule.kind == "rra"]
    # One replica on 3 devices always pairs two in a TP group; 3 replicas hold both layers each.
    assert {s.num_tp_devices for s in rra if s.num_replicas == 1} == {2}
    assert {s.num_replicas for s in rra} == {1, 3}
    # The baselines, too, use only layouts with a layer per stage: none divides 3 devices
    # into at most 2 stages, so only 3 one-device replicas remain, never an idle device.
    assert result.best_by_kind["static"].schedule.num_replicas == 3


def test_a_prefill_pays_the_first_token_where_the_decoder_layers_are() -> None:
    from exegpt.placement import Stage
    from services.scheduler.simulator.common import LayerCosts, WorkloadStats, encode_times

    problem = encoder_decoder_problem()
    costs = LayerCosts(problem.cost_model, WorkloadStats.from_workload(problem.workload))
    both = Stage((0,), 1, 1, 1)
    # A stage with a decoder layer runs its first step for the prefill's 7 rows (0.01 +
    # 0.007) beside its encoder layer's 70 tokens.
    assert encode_times(costs, [both], 7) == [(pytest.approx(0.07 + 0.017), 0.0)]
    # WAA's encoding devices hold no decoder layer: the decoding devices make that token.
    encoder_only = Stage((0,), 1, 1, 0)
    assert encode_times(costs, [encoder_only], 7) == [(pytest.approx(0.07), 0.0)]


def test_a_first_token_pass_overlaps_the_micro_batches_on_a_pipeline() -> None:
    from services.scheduler.simulator.waa import decode_demand_s, pipeline_period_s

    stages, hop_s = [(0.01, 0.0), (0.01, 0.0)], 0.002
    first = [(0.005, 0.0), (0.007, 0.0)]
    # 2 micro-batches: the loop (0.022) and then the pass's longest stage bound it.
    two = waa(4, 2, 1)
    assert decode_demand_s(stages, hop_s, two, first) == pytest.approx(0.022 + 0.007)
    # 4: the busiest stage, its 4 steps and its part of the pass (0.047), not the iteration
    # and the whole pass one after the other (0.052).
    four = waa(4, 4, 1)
    assert pipeline_period_s(stages, hop_s, 4) == pytest.approx(0.04)
    assert decode_demand_s(stages, hop_s, four, first) == pytest.approx(0.047)
    # One stage: the pass simply adds; no pass (decoder-only): the iteration alone.
    one = [(0.01, 0.0)]
    assert decode_demand_s(one, hop_s, two, [(0.005, 0.0)]) == pytest.approx(0.025)
    assert decode_demand_s(stages, hop_s, four, [(0.0, 0.0)] * 2) == pytest.approx(0.04)
