"""The schedules users run today, simulated on the same profile as RRA and WAA.

Both baselines (static batching here, continuous batching in continuous.py) place the model
on N / t pipeline stages, each a TP group of t devices (t = 1 is plain pipeline parallelism,
t = N plain tensor parallelism), layers split evenly.

Static batching, as the engine runs it (services/worker/modes/static.py). A batch of B queries
is prefilled (each sequence's first token comes with it), then decoded until its LONGEST member
finishes: finished sequences leave at once (they stop costing rows), but the next batch is
only admitted when the batch is empty. So a batch takes E[max of B output lengths] - 1 decode
steps, not the workload's maximum (FasterTransformer, with no early termination, would run
every batch to the maximum). That expectation is the order statistic computed exactly from
P_D (`expected_max_tokens`), not sampled: deterministic, and exact for any distribution. The
decode step producing token t holds the rows still running, B x P(S >= t) in expectation, so
over a batch's E[max] - 1 steps the rows sum to B x (E[S] - 1); each step is priced at their
mean (`decode_times_at`, linear between whole batch sizes, exact where a step's cost is affine
in its rows). Like FasterTransformer's pipeline parallelism (its `getLocalBatchSize`), the
batch is split into one micro-batch per pipeline stage, min(P, B) micro-batches of
ceil(B / m), which flow through the stages together in the encoding and in every decode
iteration (an iteration takes `pipeline_period_s`, as in WAA's decode side). Throughput =
B / (encode + (E[max] - 1) x iteration). Latency: the p99-length request waits for its
batch's prefill, then decodes S99 - 1 steps beside the rows still running (1 + (B' - 1) x
mean P(S >= t) over its tokens t = 2..S99, B' its micro-batch). KV is reserved for the
maximum input and output lengths of all B sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exegpt.placement import Stage, build_stages, stage_groups
from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.simulator.common import (
    LayerCosts,
    TimelineEvent,
    broadcast_events,
    decode_times_at,
    encode_times,
    encoder_output_broadcast_s,
    kv_bytes_per_sequence_layer,
    stage_weight_bytes,
    traverse,
)
from services.scheduler.simulator.waa import micro_batch_events, pipeline_period_s


def layout_options(costs: LayerCosts, num_devices: int) -> list[int]:
    """TP degrees a baseline can use on all devices: in the profile, dividing N, and leaving
    no more stages than layers."""
    shape = costs.model.shape
    max_stages = max(shape.num_encode_layers, shape.num_decode_layers)
    return [
        t for t in costs.model.tp_degrees if num_devices % t == 0 and num_devices // t <= max_stages
    ]


def even_stages(costs: LayerCosts, tp_degree: int, num_devices: int) -> list[Stage]:
    shape = costs.model.shape
    num_tp_devices = num_devices if tp_degree > 1 else 0
    groups = stage_groups(0, num_devices, tp_degree, num_tp_devices)
    ones = [1.0] * len(groups)
    return build_stages(
        groups,
        shape.num_encode_layers,
        ones,
        shape.num_decode_layers,
        ones,
        shared_layers=not shape.is_encoder_decoder,
    )


@dataclass(frozen=True)
class BaselineOutcome:
    stages: list[Stage]
    throughput_seq_s: float
    throughput_tokens_s: float
    latency_s: float
    busy_s_per_stage: list[float]
    period_s: float
    memory_bytes: list[int]


def baseline_memory(
    costs: LayerCosts,
    stages: list[Stage],
    num_devices: int,
    num_sequences: float,
    self_kv: float,
    cross_kv: float,
) -> list[int]:
    model = costs.model
    shared = not model.shape.is_encoder_decoder
    memory = [0] * num_devices
    for index, stage in enumerate(stages):
        weights = stage_weight_bytes(model, stage, shared_layers=shared)
        weights += model.embedding_weight_bytes() if index in (0, len(stages) - 1) else 0
        per_seq = kv_bytes_per_sequence_layer(model, stage.tp_degree, self_kv, cross_kv)
        kv = math.ceil(num_sequences * stage.num_decode_layers * per_seq)
        for device in stage.devices:
            memory[device] = weights + kv
    return memory


def static_kv_tokens(costs: LayerCosts) -> tuple[float, float]:
    """(self, cross) KV lengths a static batch reserves: the maximum input and output."""
    stats = costs.stats
    if costs.model.shape.is_encoder_decoder:
        return stats.max_output_tokens, stats.max_input_tokens
    return stats.max_output_tokens + stats.max_input_tokens, 0.0


def static_micro_batches(batch_size: int, num_stages: int) -> tuple[int, int]:
    """(number of micro-batches, sequences in each) of a static batch on `num_stages`."""
    num_micro = min(num_stages, batch_size)
    return num_micro, math.ceil(batch_size / num_micro)


def survival(output_pmf: np.ndarray) -> np.ndarray:
    """P(S >= t) for t = 0..max (index t) of an output-length PMF."""
    return np.cumsum(output_pmf[::-1])[::-1]


def expected_max_tokens(output_pmf: np.ndarray, num_draws: int) -> float:
    """E[max of `num_draws` independent output lengths] = sum over t >= 1 of
    1 - P(S <= t - 1)^n: the steps a static batch of that many sequences decodes."""
    at_least = survival(output_pmf)[1:]
    return float(np.sum(1.0 - (1.0 - at_least) ** num_draws))


def rows_beside(output_pmf: np.ndarray, num_tokens: int, batch_size: int) -> float:
    """Mean rows of a static batch of `batch_size` over the decode steps of one of its
    sequences that runs `num_tokens` long (its tokens t = 2..num_tokens; the first comes with
    the prefill): itself plus each other one still running, P(S >= t). A one-token sequence
    decodes nothing: its batch's rows at the prefill, `batch_size`."""
    if num_tokens < 2:
        return float(batch_size)
    at_least = survival(output_pmf)[2 : num_tokens + 1]
    at_least = np.pad(at_least, (0, num_tokens - 1 - len(at_least)))
    return 1.0 + (batch_size - 1) * float(at_least.mean())


def run_static(
    costs: LayerCosts,
    schedule: Schedule,
    num_devices: int,
    events: list[TimelineEvent] | None = None,
) -> BaselineOutcome:
    batch = schedule.encode_batch_size
    stages = even_stages(costs, schedule.tp_degree, num_devices)
    num_micro, micro_batch = static_micro_batches(batch, len(stages))
    enc_times = encode_times(costs, stages, micro_batch)
    enc_hop_s = costs.activation_transfer_s(costs.encode_tokens(micro_batch))
    # m micro-batches through P stages: the first one's traversal, then one per slowest stage.
    encode_s = traverse(stages, enc_times, enc_hop_s, 0.0, "encode", "", None)
    encode_s += (num_micro - 1) * max(c + sync for c, sync in enc_times)
    # Each micro-batch's encoder output goes to every stage's cross-attention.
    broadcast_s = encoder_output_broadcast_s(costs, len(stages), costs.encode_tokens(micro_batch))
    encode_s += broadcast_s
    stats = costs.stats
    # The first token of each sequence comes with the prefill: E[max] - 1 decode steps hold
    # the B x (E[S] - 1) rows that decode.
    num_steps = max(0.0, expected_max_tokens(stats.output_pmf, batch) - 1.0)
    live_rows = micro_batch * (stats.mean_output_tokens - 1.0) / num_steps if num_steps else 1.0
    dec_times = decode_times_at(costs, stages, live_rows)
    hop_s = costs.activation_transfer_s(micro_batch)
    iteration_s = pipeline_period_s(dec_times, hop_s, num_micro)
    batch_s = encode_s + num_steps * iteration_s
    p99_rows = rows_beside(stats.output_pmf, stats.output_p99_tokens, micro_batch)
    p99_times = decode_times_at(costs, stages, p99_rows)
    period_s = pipeline_period_s(p99_times, hop_s, num_micro)
    latency_s = encode_s + stats.p99_decode_steps * period_s
    if events is not None:
        # Each micro-batch starts decoding when its own encoding (and broadcast) is done.
        state = micro_batch_events(
            stages, enc_times, enc_hop_s, num_micro, 1, 0.0, events, kind="encode"
        )
        if broadcast_s > 0:
            for end_s in state.ready_s:
                events.extend(broadcast_events(stages, end_s, broadcast_s))
            state.ready_s = [end_s + broadcast_s for end_s in state.ready_s]
        if (shown_steps := round(num_steps)) > 0:
            micro_batch_events(
                stages, dec_times, hop_s, num_micro, shown_steps, 0.0, events, state=state
            )
    busy = [
        num_micro * (sum(e) + num_steps * sum(d)) for e, d in zip(enc_times, dec_times, strict=True)
    ]
    self_kv, cross_kv = static_kv_tokens(costs)
    memory = baseline_memory(costs, stages, num_devices, batch, self_kv, cross_kv)
    mean_out = stats.mean_output_tokens
    return BaselineOutcome(
        stages, batch / batch_s, batch * mean_out / batch_s, latency_s, busy, batch_s, memory
    )


def static_schedule(batch_size: int, tp_degree: int, num_devices: int) -> Schedule:
    return Schedule(
        kind=ScheduleKind.STATIC,
        encode_batch_size=batch_size,
        decode_batch_size=batch_size,
        tp_degree=tp_degree,
        num_tp_devices=num_devices if tp_degree > 1 else 0,
    )
