"""WAA (workload-aware allocation) in the XSimulator, and the micro-batched decode pipeline
it shares with the continuous-batching baseline.

The first `num_encode_devices` devices only encode (a pipeline holding every encode layer;
for decoder-only models that is a second copy of the decoder layers), the others only decode
(a pipeline holding every decoder layer; partial TP applies to the decode side, whose first
`num_tp_devices` devices form TP groups). They run asynchronously: every cycle one batch of
B_E is encoded, handed over, and joins the decode batch; the decode side iterates at its own
pace meanwhile (several tokens per cycle when encoding is the slower side, as the paper's
figures imply and as the engine's WAA mode runs). A query's first token comes with its
prefill (as in every kind), so it decodes m = mean output - 1 iterations (at least 1): at the
cap B_E x m rows decode, and the engine's running cap B_D = B_E x mean output also holds the
B_E queries of the encoding in flight. An encoder-decoder's encoding devices hold no decoder
layer, so its first token comes from a pass of its own on the decode side once the encoder
output is handed over (`first_token_times`: every decoder layer's first step of the B_E
rows): once a cycle, beside the iterations.

- Encode side: consecutive batches are independent, so it is a full pipeline: it accepts a
  batch every `max(stage time)`.
- Hand-over: decoder-only models move the prefill KV of each decode stage's layers to it;
  encoder-decoder models send the encoder output to every decode stage (each computes its
  own cross K/V). Stages receive in parallel; the slowest link occupies `handoff_s`.
- Decode side: the batch is split into B_m micro-batches. A micro-batch's next token needs its
  previous one from the last stage, so one iteration of all micro-batches takes
  `max(sum of stage times + transfers, B_m x slowest stage)` (the steady state of that cyclic
  pipeline; the paper's figure: two tokens in 7 stage-times without micro-batches, 3 2/3 with).
- cycle_s = max(encode period, hand-over, decode iteration at B_E x m rows plus the first-token
  pass); throughput = B_E / cycle_s (at the cap, B_E x m sequences finish every m
  iterations). The pass takes its share of every cycle from the iterations (on several
  stages it overlaps the micro-batches' steps: `decode_demand_s`), so each iteration of a
  running sequence lasts cycle / (cycle - that share) times its own time.
- The decode batch in steady state: a sequence stays for m iterations, so by Little's law
  it holds B = throughput x m x iteration(B) sequences, at most B_E x m and at least B_E (an
  encoding hands its batch over at once). When encoding is the slower side that is below
  the cap, and each iteration is shorter than a cycle (`steady_decode_batch`).
- Latency of the p99 sequence: encode traversal + hand-over (+ the first-token pass) + S99 - 1
  tokens at that batch (iterations, stretched by the pass's share of the cycle).

How many devices encode: WAA-C gives N * C_E / (C_E + C_D) devices to encoding, C_E and C_D
being the single-device compute times of one encode of B_E and one decode iteration of
B_E x m rows (the work of one cycle), evaluated at B_E = 1, 8 and 64; the search tries the
floor and ceiling of each (C_D also holds an encoder-decoder's first-token pass). WAA-M
gives encoding the fewest devices that hold its weights and
the decode side everything else, so that the most memory goes to KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from exegpt.placement import Stage, build_stages, stage_groups
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.simulator.common import (
    KV_HEADROOM,
    LayerCosts,
    StageTimes,
    TimelineEvent,
    as_batch,
    clip_window,
    decode_times,
    encode_times,
    first_token_times,
    kv_bytes_per_sequence_layer,
    stage_weight_bytes,
    traverse,
)

_WAA_C_REFERENCE_BATCHES = (1, 8, 64)


def pipeline_period_s(times: StageTimes, hop_s: float, num_micro_batches: int) -> float:
    """Steady-state time for every micro-batch to advance one token."""
    stage_s = [compute_s + sync_s for compute_s, sync_s in times]
    loop_s = sum(stage_s) + hop_s * (len(stage_s) - 1)
    return max(loop_s, num_micro_batches * max(stage_s))


def decode_demand_s(
    times: StageTimes, hop_s: float, schedule: Schedule, first_times: StageTimes
) -> float:
    """The decode side's time for one iteration of every micro-batch plus one first-token pass
    (`first_times`, zeros for a decoder-only model): the pass's own traversal holds each
    stage once, beside the micro-batches' steps, so a pipeline of several stages overlaps
    it with them; on one stage it simply adds."""
    stage_s = [compute_s + sync_s for compute_s, sync_s in times]
    first_s = [compute_s + sync_s for compute_s, sync_s in first_times]
    loop_s = sum(stage_s) + hop_s * (len(stage_s) - 1)
    busiest_s = max(
        schedule.num_micro_batches * s + f for s, f in zip(stage_s, first_s, strict=True)
    )
    return max(loop_s + max(first_s), busiest_s)


@dataclass
class PipelineState:
    """When each stage is next free and when each micro-batch's next step may start."""

    stage_free_s: list[float]
    ready_s: list[float]

    @classmethod
    def empty(cls, num_stages: int, num_micro_batches: int) -> PipelineState:
        return cls([0.0] * num_stages, [0.0] * num_micro_batches)


def micro_batch_events(
    stages: list[Stage],
    times: StageTimes,
    hop_s: float,
    num_micro_batches: int,
    num_iterations: int,
    gate_period_s: float,
    events: list[TimelineEvent],
    *,
    state: PipelineState | None = None,
    kind: str = "decode",
) -> PipelineState:
    """Greedy in-order schedule of micro-batches through the stages for a few iterations;
    iteration i may not start before i * gate_period_s (the arrival of new work). Starts from
    `state` (an empty pipeline at time 0 by default) and returns the state after."""
    state = state or PipelineState.empty(len(stages), num_micro_batches)
    stage_free_s, ready_s = list(state.stage_free_s), list(state.ready_s)
    for iteration in range(num_iterations):
        for micro in range(num_micro_batches):
            now = max(ready_s[micro], iteration * gate_period_s)
            label = f"{kind} {iteration + 1}.{micro + 1}"
            for index, (stage, (compute_s, sync_s)) in enumerate(zip(stages, times, strict=True)):
                if index > 0:
                    events.extend(
                        TimelineEvent(d, now, now + hop_s, "transfer", label) for d in stage.devices
                    )
                    now += hop_s
                now = max(now, stage_free_s[index])
                events.extend(
                    TimelineEvent(d, now, now + compute_s, kind, label) for d in stage.devices
                )
                if sync_s > 0:
                    events.extend(
                        TimelineEvent(
                            d, now + compute_s, now + compute_s + sync_s, "allreduce", label
                        )
                        for d in stage.devices
                    )
                now += compute_s + sync_s
                stage_free_s[index] = now
            ready_s[micro] = now
    return PipelineState(stage_free_s, ready_s)


@dataclass(frozen=True)
class WaaOutcome:
    encode_stages: list[Stage]
    decode_stages: list[Stage]
    encode_times: StageTimes
    decode_times: StageTimes
    decode_batch: float  # the running cap B_D: the decoding rows and the encoding in flight
    decoding_rows: float  # the rows a decode iteration holds at the cap: B_E x decode steps
    micro_batch: int
    encode_traverse_s: float
    encode_period_s: float
    handoff_s: float
    iteration_s: float
    cycle_s: float
    latency_s: float
    # Encoder-decoder: the decode stages' pass for each encoded batch's first token (zeros
    # for a decoder-only model, whose prefill on the encoding devices makes it).
    first_token_times: StageTimes


def _stages(
    costs: LayerCosts, schedule: Schedule, num_devices: int, micro_batch: int
) -> tuple[list[Stage], list[Stage]]:
    shape = costs.model.shape
    num_encode = schedule.num_encode_devices
    encode_groups = stage_groups(0, num_encode, 1, 0)
    encode_stages = build_stages(
        encode_groups,
        shape.num_encode_layers,
        [1.0] * num_encode,
        0,
        [1.0] * num_encode,
        shared_layers=False,
    )
    decode_groups = stage_groups(
        num_encode, num_devices - num_encode, schedule.tp_degree, schedule.num_tp_devices
    )
    decode_cost = [sum(costs.decode(micro_batch, tp)) for _, tp in decode_groups]
    decode_stages = build_stages(
        decode_groups, 0, decode_cost, shape.num_decode_layers, decode_cost, shared_layers=False
    )
    return encode_stages, decode_stages


def _handoff_s(costs: LayerCosts, stages: list[Stage], encode_batch: int) -> float:
    tokens = costs.encode_tokens(encode_batch)
    if costs.model.shape.is_encoder_decoder:
        return costs.activation_transfer_s(tokens)
    return max(
        costs.transfer_s(
            tokens * stage.num_decode_layers * costs.model.kv_bytes_per_token(stage.tp_degree)
        )
        for stage in stages
    )


def run(costs: LayerCosts, schedule: Schedule, num_devices: int) -> WaaOutcome:
    decode_batch = schedule.encode_batch_size * costs.stats.mean_output_tokens
    decoding_rows = schedule.encode_batch_size * decode_steps(costs)
    micro_batch = as_batch(decoding_rows / schedule.num_micro_batches)
    encode_stages, decode_stages = _stages(costs, schedule, num_devices, micro_batch)
    enc_times = encode_times(costs, encode_stages, schedule.encode_batch_size)
    enc_hop_s = costs.activation_transfer_s(costs.encode_tokens(schedule.encode_batch_size))
    encode_traverse_s = traverse(encode_stages, enc_times, enc_hop_s, 0.0, "encode", "", None)
    encode_period_s = max(compute_s + sync_s for compute_s, sync_s in enc_times)
    handoff_s = _handoff_s(costs, decode_stages, schedule.encode_batch_size)
    dec_times = decode_times(costs, decode_stages, micro_batch)
    hop_s = costs.activation_transfer_s(micro_batch)
    iteration_s = pipeline_period_s(dec_times, hop_s, schedule.num_micro_batches)
    first_times: StageTimes = [(0.0, 0.0)] * len(decode_stages)
    if costs.model.shape.is_encoder_decoder:
        first_times = first_token_times(costs, decode_stages, schedule.encode_batch_size)
    first_pass_s = sum(compute_s + sync_s for compute_s, sync_s in first_times)
    pass_share_s = decode_demand_s(dec_times, hop_s, schedule, first_times) - iteration_s
    cycle_s = max(encode_period_s, handoff_s, iteration_s + pass_share_s)
    _, token_s = steady_decode_batch(
        costs, decode_stages, schedule, decoding_rows, iteration_s, cycle_s, pass_share_s
    )
    latency_s = encode_traverse_s + handoff_s + first_pass_s
    latency_s += costs.stats.p99_decode_steps * token_s
    return WaaOutcome(
        encode_stages,
        decode_stages,
        enc_times,
        dec_times,
        decode_batch,
        decoding_rows,
        micro_batch,
        encode_traverse_s,
        encode_period_s,
        handoff_s,
        iteration_s,
        cycle_s,
        latency_s,
        first_times,
    )


def decode_steps(costs: LayerCosts) -> float:
    """Decode iterations a sequence runs (WorkloadStats.mean_decode_steps)."""
    return costs.stats.mean_decode_steps


_STEADY_ITERATIONS = 12
_STEADY_TOLERANCE = 0.01


def steady_decode_batch(
    costs: LayerCosts,
    stages: list[Stage],
    schedule: Schedule,
    cap: float,
    cap_iteration_s: float,
    cycle_s: float,
    first_pass_s: float = 0.0,
) -> tuple[float, float]:
    """(decode batch, a running sequence's time per token) in steady state: the largest
    B <= cap (decoding rows) with B = B_E x m x token(B) / cycle_s (Little's law, m =
    `decode_steps`; token(B), an iteration at B stretched by cycle / (cycle - first_pass_s)
    for the first-token pass each cycle, grows with B, so the map is monotone and iterating
    it down from the cap converges), and at least B_E: encoded queries join in batches of
    B_E, so a batch's tokens never decode beside fewer."""
    arrivals_per_s = schedule.encode_batch_size / cycle_s
    stretch = cycle_s / (cycle_s - first_pass_s)  # cycle_s > first_pass_s: run() makes it so
    mean_steps = decode_steps(costs)
    floor = float(schedule.encode_batch_size)
    batch, iteration_s = cap, cap_iteration_s
    for _ in range(_STEADY_ITERATIONS):
        wanted = min(cap, max(floor, arrivals_per_s * mean_steps * iteration_s * stretch))
        if wanted >= batch * (1 - _STEADY_TOLERANCE):
            break
        batch = wanted
        micro_batch = as_batch(batch / schedule.num_micro_batches)
        times = decode_times(costs, stages, micro_batch)
        hop_s = costs.activation_transfer_s(micro_batch)
        iteration_s = pipeline_period_s(times, hop_s, schedule.num_micro_batches)
    return batch, iteration_s * stretch


def memory_bytes(
    costs: LayerCosts, outcome: WaaOutcome, schedule: Schedule, num_devices: int
) -> list[int]:
    model = costs.model
    shape = model.shape
    stats = costs.stats
    memory = [0] * num_devices
    encode_tokens = costs.encode_tokens(schedule.encode_batch_size)
    last_encode = len(outcome.encode_stages) - 1
    for index, stage in enumerate(outcome.encode_stages):
        weights = stage_weight_bytes(model, stage, shared_layers=False)
        weights += model.embedding_weight_bytes() if index == 0 else 0
        if shape.is_encoder_decoder:
            # The encoder output waiting to be handed over.
            in_flight = encode_tokens * shape.hidden_bytes_per_token if index == last_encode else 0
        else:
            in_flight = encode_tokens * stage.num_encode_layers * model.kv_bytes_per_token(1)
        for device in stage.devices:
            memory[device] = weights + in_flight
    self_kv = stats.running_position_tokens
    cross_kv = stats.mean_input_tokens if shape.is_encoder_decoder else 0.0
    if not shape.is_encoder_decoder:
        self_kv += stats.mean_input_tokens
    last_decode = len(outcome.decode_stages) - 1
    for index, stage in enumerate(outcome.decode_stages):
        weights = stage_weight_bytes(model, stage, shared_layers=False)
        weights += model.embedding_weight_bytes() if index in (0, last_decode) else 0
        per_seq = kv_bytes_per_sequence_layer(model, stage.tp_degree, self_kv, cross_kv)
        kv = outcome.decode_batch * KV_HEADROOM * stage.num_decode_layers * per_seq
        for device in stage.devices:
            memory[device] = weights + math.ceil(kv)
    return memory


def utilisation(outcome: WaaOutcome, schedule: Schedule, num_devices: int) -> list[float]:
    busy = [0.0] * num_devices
    for stage, (compute_s, sync_s) in zip(outcome.encode_stages, outcome.encode_times, strict=True):
        for device in stage.devices:
            busy[device] = compute_s + sync_s
    decode_side = zip(
        outcome.decode_stages, outcome.decode_times, outcome.first_token_times, strict=True
    )
    for stage, (compute_s, sync_s), (first_s, first_sync_s) in decode_side:
        for device in stage.devices:
            busy[device] = schedule.num_micro_batches * (compute_s + sync_s)
            busy[device] += first_s + first_sync_s
    return [min(1.0, b / outcome.cycle_s) for b in busy]


def timeline(
    costs: LayerCosts, schedule: Schedule, num_devices: int, num_cycles: int = 3
) -> list[TimelineEvent]:
    """`num_cycles` cycles of steady state: encodes pipelined on the encode devices with their
    hand-overs, and the micro-batched decode iterations (one per cycle). The simulation starts
    empty, runs warm-up cycles, and the window after them is returned."""
    outcome = run(costs, schedule, num_devices)
    cycle_s = outcome.cycle_s
    warmup = len(outcome.encode_stages) + len(outcome.decode_stages) + 2
    total = warmup + num_cycles
    events: list[TimelineEvent] = []
    enc_hop_s = costs.activation_transfer_s(costs.encode_tokens(schedule.encode_batch_size))
    for cycle in range(total):
        label = f"batch {cycle + 1}"
        end_s = traverse(
            outcome.encode_stages,
            outcome.encode_times,
            enc_hop_s,
            cycle * cycle_s,
            "encode",
            label,
            events,
        )
        events.extend(
            TimelineEvent(d, end_s, end_s + outcome.handoff_s, "transfer", f"hand-over {label}")
            for stage in outcome.decode_stages
            for d in stage.devices
        )
    micro_batch_events(
        outcome.decode_stages,
        outcome.decode_times,
        costs.activation_transfer_s(outcome.micro_batch),
        schedule.num_micro_batches,
        total,
        cycle_s,
        events,
    )
    return clip_window(events, warmup * cycle_s, total * cycle_s)


def normalised(schedule: Schedule, outcome: WaaOutcome) -> Schedule:
    has_tp = schedule.tp_degree > 1 and schedule.num_tp_devices > 0
    return Schedule(
        kind=schedule.kind,
        encode_batch_size=schedule.encode_batch_size,
        decode_batch_size=as_batch(outcome.decode_batch),
        num_micro_batches=schedule.num_micro_batches,
        tp_degree=schedule.tp_degree if has_tp else 1,
        num_tp_devices=schedule.num_tp_devices if has_tp else 0,
        num_encode_devices=schedule.num_encode_devices,
    )


def split_candidates(
    costs: LayerCosts, kind: ScheduleKind, num_devices: int, capacity_bytes: int
) -> list[int]:
    """Numbers of encode devices a kind tries (see the module docstring)."""
    if num_devices < 2:
        return []
    shape = costs.model.shape
    clamp = lambda n: min(num_devices - 1, max(1, n))  # noqa: E731
    if kind == ScheduleKind.WAA_M:
        weights = shape.num_encode_layers * costs.model.encode_layer_weight_bytes(1)
        weights += costs.model.embedding_weight_bytes()
        return [clamp(math.ceil(weights / capacity_bytes))]
    candidates: set[int] = set()
    for batch in _WAA_C_REFERENCE_BATCHES:
        encode_s = shape.num_encode_layers * sum(costs.encode(batch, 1))
        decode_batch = as_batch(batch * decode_steps(costs))
        decode_s = shape.num_decode_layers * sum(costs.decode(decode_batch, 1))
        # An encoder-decoder's decode side also makes each batch's first token.
        decode_s += shape.num_decode_layers * sum(costs.first_step(batch, 1))
        share = num_devices * encode_s / (encode_s + decode_s)
        candidates.update((clamp(math.floor(share)), clamp(math.ceil(share))))
    return sorted(candidates)
