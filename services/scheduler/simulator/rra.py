"""RRA (round-robin allocation) in the XSimulator.

Every pipeline stage holds a slice of the encode layers and of the decode layers (one slice
for decoder-only models, whose layers serve both phases). With partial TP the first
`num_tp_devices` devices form groups of `tp_degree` that act as one stage each; layers are
divided so stage times balance (evenly without TP).

One steady-state cycle is: encode B_E queries through all stages, then N_D decode iterations.
There are no micro-batches, so a decode iteration is a full traversal of the pipeline (the
next token needs the one just sampled at the last stage): one token costs the SUM of the
stage times plus the P - 1 activation transfers, and a device idles while the others work.
The encoded batch joins the decode batch; encoding blocks decoding (the runtime alternates).

A query's first token comes with its encoding (the engine samples it from the prefill, as in
every kind), so a query of output length S decodes D = S - 1 tokens in the decode iterations
(`decode_steps_pmf`). Batch sizes follow the paper: a query finishes U iterations after an
encoding with P_D(U|D) (docs/design.md section 3.2), weighted by the lengths of the sequences
in the decode batch (a query stays ceil(D / N_D) cycles, so long ones are over-represented
there), B_D = B_E * E[ceil(D / N_D)] (Little's law; a one-token query never joins it), and
iteration u runs the B_D sequences that have not finished in iterations 1..u-1:
b_u = B_D (1 - sum_{U<u} P_D(U)). B_E sequences finish per cycle, so throughput =
B_E / cycle_s. The p99-length sequence decodes D99 = S99 - 1 iterations: it is encoded, waits
through ceil(D99 / N_D) - 1 further encodings and finishes at iteration 1 + (D99 - 1) mod N_D
of its last cycle (at its encoding when D99 = 0).

Memory per device: its layer weights, the embedding/LM head on the first and last stage, and
KV for the B_D running sequences at their expected lengths (with `KV_HEADROOM`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exegpt.placement import Stage, build_stages, stage_groups
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.simulator.common import (
    KV_HEADROOM,
    LayerCosts,
    StageTimes,
    TimelineEvent,
    as_batch,
    broadcast_events,
    decode_times,
    encode_times,
    encoder_output_broadcast_s,
    kv_bytes_per_sequence_layer,
    stage_weight_bytes,
    traverse,
)


def decode_steps_pmf(output_pmf: np.ndarray) -> np.ndarray:
    """P(D = d) of the decode steps D = S - 1 of an output of S tokens (the first comes with
    the encoding; an empty output decodes nothing either)."""
    steps = output_pmf[1:].copy()
    if len(steps):
        steps[0] += output_pmf[0]
    return steps


def completion_pmf(steps_pmf: np.ndarray, num_decode_iterations: int) -> np.ndarray:
    """P_D(U) for U = 0..N_D (index 0 unused): the paper's P_D(U|D), D the decode steps of a
    query (`decode_steps_pmf`), weighted by the lengths of the sequences IN the decode batch,
    not of the queries encoded; the fraction of the batch that finishes at iteration U.

    A query of D steps stays ceil(D / N_D) cycles, so the batch holds it in proportion to
    P(D) * ceil(D / N_D) (Little's law). Weighting by the queries' P(D) instead would
    over-count short sequences and size B_D too small for B_E (the engine, which keeps the
    batch at B_D, then encodes fewer than B_E per cycle)."""
    n = num_decode_iterations
    lengths = np.arange(len(steps_pmf))
    cycles = np.ceil(lengths / n)
    in_batch = np.where(lengths >= 1, steps_pmf * cycles, 0.0)
    if in_batch.sum() <= 0:  # one-token outputs only: nothing is ever decoded
        return np.zeros(n + 1)
    in_batch = in_batch / in_batch.sum()
    by_iteration = np.zeros(n + 1)
    short = (lengths >= 1) & (lengths <= n)
    by_iteration += np.bincount(lengths[short], in_batch[short], minlength=n + 1)
    long = lengths > n
    finish = 1 + (lengths[long] - 1) % n
    weight = in_batch[long] / cycles[long]
    by_iteration += np.bincount(finish, weight, minlength=n + 1)
    return by_iteration


def decode_batch_size(
    encode_batch_size: int, steps_pmf: np.ndarray, num_decode_iterations: int
) -> float:
    """B_D = B_E * E[ceil(D / N_D)]: each cycle B_E queries join for their cycles (Little's
    law; a query of no decode step finishes at its encoding and never joins)."""
    lengths = np.arange(len(steps_pmf))
    cycles = np.ceil(lengths / num_decode_iterations)
    return encode_batch_size * float(np.dot(steps_pmf, cycles))


def iteration_batch_sizes(decode_batch: float, by_iteration: np.ndarray) -> np.ndarray:
    """Expected batch of iterations u = 1..N_D: those not finished before u."""
    finished_before = np.concatenate(([0.0], np.cumsum(by_iteration[1:-1])))
    return decode_batch * (1.0 - finished_before)


@dataclass(frozen=True)
class RraLayout:
    stages: list[Stage]
    decode_batch: float
    iteration_batches: list[int]


def layout(costs: LayerCosts, schedule: Schedule, num_devices: int) -> RraLayout:
    shape = costs.model.shape
    steps = decode_steps_pmf(costs.stats.output_pmf)
    by_iteration = completion_pmf(steps, schedule.num_decode_iterations)
    decode_batch = decode_batch_size(
        schedule.encode_batch_size, steps, schedule.num_decode_iterations
    )
    batches = [as_batch(b) for b in iteration_batch_sizes(decode_batch, by_iteration)]
    groups = stage_groups(0, num_devices, schedule.tp_degree, schedule.num_tp_devices)
    encode_cost = [sum(costs.encode(schedule.encode_batch_size, tp)) for _, tp in groups]
    decode_cost = [
        sum(costs.decode(as_batch(decode_batch), tp)) * schedule.num_decode_iterations
        for _, tp in groups
    ]
    stages = build_stages(
        groups,
        shape.num_encode_layers,
        encode_cost,
        shape.num_decode_layers,
        decode_cost,
        shared_layers=not shape.is_encoder_decoder,
    )
    return RraLayout(stages, decode_batch, batches)


@dataclass(frozen=True)
class RraOutcome:
    layout: RraLayout
    encode_s: float
    iteration_s: list[float]  # u = 1..N_D
    cycle_s: float
    latency_s: float
    busy_s_per_stage: list[float]


def run_cycle(
    costs: LayerCosts,
    schedule: Schedule,
    num_devices: int,
    events: list[TimelineEvent] | None = None,
) -> RraOutcome:
    """Time one steady-state cycle (and record its events when `events` is given)."""
    plan = layout(costs, schedule, num_devices)
    stages = plan.stages
    busy = [0.0] * len(stages)
    enc_times = encode_times(costs, stages, schedule.encode_batch_size)
    enc_tokens = costs.encode_tokens(schedule.encode_batch_size)
    now = traverse(
        stages,
        enc_times,
        costs.activation_transfer_s(enc_tokens),
        0.0,
        "encode",
        "encode",
        events,
    )
    # Every stage's decoder layers cross-attend to the encoder output: broadcast it.
    broadcast_s = encoder_output_broadcast_s(costs, len(stages), enc_tokens)
    if events is not None and broadcast_s > 0:
        events.extend(broadcast_events(stages, now, broadcast_s))
    now += broadcast_s
    encode_s = now
    for index, (compute_s, sync_s) in enumerate(enc_times):
        busy[index] += compute_s + sync_s
    iteration_s: list[float] = []
    memo: dict[int, tuple[float, StageTimes]] = {}
    for u, batch in enumerate(plan.iteration_batches, start=1):
        if batch not in memo or events is not None:
            times = decode_times(costs, stages, batch)
            hop_s = costs.activation_transfer_s(batch)
            end_s = traverse(stages, times, hop_s, now, "decode", f"decode {u}", events)
            memo[batch] = (end_s - now, times)
        step_s, times = memo[batch]
        for index, (compute_s, sync_s) in enumerate(times):
            busy[index] += compute_s + sync_s
        iteration_s.append(step_s)
        now += step_s
    cycle_s = now
    latency_s = _p99_latency_s(
        costs.stats.output_p99_tokens, schedule, encode_s, iteration_s, cycle_s
    )
    return RraOutcome(plan, encode_s, iteration_s, cycle_s, latency_s, busy)


def _p99_latency_s(
    p99_tokens: int, schedule: Schedule, encode_s: float, iteration_s: list[float], cycle_s: float
) -> float:
    """The p99-length sequence: its encoding (the first token), then its S99 - 1 decode steps."""
    decode_steps = p99_tokens - 1
    if decode_steps < 1:
        return encode_s
    num_cycles = math.ceil(decode_steps / schedule.num_decode_iterations)
    last_iteration = 1 + (decode_steps - 1) % schedule.num_decode_iterations
    return encode_s + (num_cycles - 1) * cycle_s + sum(iteration_s[:last_iteration])


def memory_bytes(costs: LayerCosts, plan: RraLayout, num_devices: int) -> list[int]:
    model = costs.model
    shape = model.shape
    stats = costs.stats
    self_kv = stats.running_position_tokens
    cross_kv = stats.mean_input_tokens if shape.is_encoder_decoder else 0.0
    if not shape.is_encoder_decoder:
        self_kv += stats.mean_input_tokens
    memory = [0] * num_devices
    last = len(plan.stages) - 1
    for index, stage in enumerate(plan.stages):
        weights = stage_weight_bytes(model, stage, shared_layers=not shape.is_encoder_decoder)
        if index in (0, last):
            weights += model.embedding_weight_bytes()
        per_seq = kv_bytes_per_sequence_layer(model, stage.tp_degree, self_kv, cross_kv)
        kv = plan.decode_batch * KV_HEADROOM * stage.num_decode_layers * per_seq
        for device in stage.devices:
            memory[device] = weights + math.ceil(kv)
    return memory


def normalised(schedule: Schedule, plan: RraLayout) -> Schedule:
    has_tp = schedule.tp_degree > 1 and schedule.num_tp_devices > 0
    return Schedule(
        kind=ScheduleKind.RRA,
        encode_batch_size=schedule.encode_batch_size,
        decode_batch_size=as_batch(plan.decode_batch),
        num_decode_iterations=schedule.num_decode_iterations,
        tp_degree=schedule.tp_degree if has_tp else 1,
        num_tp_devices=schedule.num_tp_devices if has_tp else 0,
    )
