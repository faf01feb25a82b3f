"""Continuous (iteration-level) batching, as the engine runs it (Orca, vLLM;
services/worker/modes/continuous.py), simulated on the same profile as RRA and WAA.

The model sits on N / t pipeline stages of t devices, layers split evenly (baselines.py).
Up to B sequences run; with P stages the engine keeps P micro-batches of B / P in flight
(vLLM's virtual engines), and one iteration of all of them takes `pipeline_period_s` (as in
WAA's decode side). Per micro-batch, at steady state with a queue waiting:

- A sequence's first token comes with its prefill, so it runs m = E[S] - 1 decode steps
  (at least 1). Each decode step holds the full micro-batch b = B / P: the engine prefills
  the sequences that take the slots freed by a step before the next decode step.
- Each running sequence finishes at a given step with probability 1 / m (renewal at steady
  state), so a step frees b / m slots on average and is followed by a prefill only when at
  least one finished: q = 1 - (1 - 1/m)^b prefills per iteration, of b / (m q) sequences
  each. A prefill step has a fixed cost (its host work, the embedding, a forward launch) that
  a few large prefills pay less often than many small ones, so both are counted as the
  engine runs them: few rows of long outputs (G) admit one or two sequences every other
  step, many rows of short outputs (S) admit several nearly every step.
- An iteration = a decode step of b rows + q prefills of b / (m q) rows (linear between whole
  batch sizes: `encode_times_at`). Throughput = B / (m x iteration). The p99-length sequence
  waits for its own prefill (for an encoder-decoder model on more than one stage, with the
  encoder output's broadcast to every stage's cross-attention, as the static baseline and
  RRA charge it), then S99 - 1 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler.simulator.baselines import BaselineOutcome, baseline_memory, even_stages
from services.scheduler.simulator.common import (
    KV_HEADROOM,
    LayerCosts,
    TimelineEvent,
    as_batch,
    clip_window,
    decode_times,
    encode_times_at,
    encoder_output_broadcast_s,
    traverse,
)
from services.scheduler.simulator.waa import micro_batch_events, pipeline_period_s


@dataclass(frozen=True)
class SteadyState:
    """One micro-batch of continuous batching at steady state, per iteration."""

    running: float  # sequences in each decode step (B / P)
    decode_steps: float  # decode steps a sequence runs (its first token comes with its prefill)
    prefills: float  # prefill steps per iteration (at least one slot freed)
    prefill_rows: float  # sequences each prefill admits

    @property
    def admitted(self) -> float:
        """Sequences admitted (and finished) per iteration."""
        return self.running / self.decode_steps


def steady_state(costs: LayerCosts, running_batch: int, num_stages: int) -> SteadyState:
    """The steady state of one of `num_stages` micro-batches of a running batch."""
    running = running_batch / num_stages
    decode_steps = costs.stats.mean_decode_steps
    prefills = 1.0 - (1.0 - 1.0 / decode_steps) ** running
    return SteadyState(running, decode_steps, prefills, running / (decode_steps * prefills))


def run_continuous(
    costs: LayerCosts,
    schedule: Schedule,
    num_devices: int,
    events: list[TimelineEvent] | None = None,
) -> BaselineOutcome:
    running = schedule.decode_batch_size
    stages = even_stages(costs, schedule.tp_degree, num_devices)
    num_stages = len(stages)
    micro_batch = as_batch(running / num_stages)
    steady = steady_state(costs, running, num_stages)
    prefill_times = encode_times_at(costs, stages, steady.prefill_rows)
    dec_times = decode_times(costs, stages, micro_batch)
    times = [
        (dc + steady.prefills * pc, ds + steady.prefills * ps)
        for (dc, ds), (pc, ps) in zip(dec_times, prefill_times, strict=True)
    ]
    hop_s = costs.activation_transfer_s(micro_batch)
    iteration_s = pipeline_period_s(times, hop_s, num_stages)
    if events is not None:
        # Start empty, let the pipeline fill, then keep three iterations of steady state.
        warmup, num_shown = num_stages + 1, 3
        filling: list[TimelineEvent] = []
        micro_batch_events(stages, times, hop_s, num_stages, warmup + num_shown, 0.0, filling)
        events.extend(
            clip_window(filling, warmup * iteration_s, (warmup + num_shown) * iteration_s)
        )
    stats = costs.stats
    prefill_hop_s = costs.activation_transfer_s(costs.encode_tokens(as_batch(steady.prefill_rows)))
    prefill_s = traverse(stages, prefill_times, prefill_hop_s, 0.0, "encode", "", None)
    prefill_tokens = costs.encode_tokens(as_batch(steady.prefill_rows))
    prefill_s += encoder_output_broadcast_s(costs, num_stages, prefill_tokens)
    latency_s = prefill_s + stats.p99_decode_steps * iteration_s
    busy = [num_stages * (c + s) for c, s in times]
    self_kv = stats.running_position_tokens
    cross_kv = stats.mean_input_tokens if costs.model.shape.is_encoder_decoder else 0.0
    if not costs.model.shape.is_encoder_decoder:
        self_kv += stats.mean_input_tokens
    memory = baseline_memory(costs, stages, num_devices, running * KV_HEADROOM, self_kv, cross_kv)
    throughput = running / (steady.decode_steps * iteration_s)
    return BaselineOutcome(
        stages,
        throughput,
        throughput * stats.mean_output_tokens,
        latency_s,
        busy,
        iteration_s,
        memory,
    )


def continuous_schedule(
    costs: LayerCosts, running_batch: int, tp_degree: int, num_devices: int
) -> Schedule:
    """The continuous schedule of `running_batch` on a layout; its encode batch size is the
    sequences admitted per iteration, over all micro-batches."""
    num_stages = num_devices // tp_degree
    steady = steady_state(costs, running_batch, num_stages)
    return Schedule(
        kind=ScheduleKind.CONTINUOUS,
        encode_batch_size=as_batch(steady.admitted * num_stages),
        decode_batch_size=running_batch,
        num_micro_batches=num_stages,
        tp_degree=tp_degree,
        num_tp_devices=num_devices if tp_degree > 1 else 0,
    )
