"""Building blocks shared by the XSimulator's schedule kinds (plain Python, no grpc).

- `WorkloadStats`: the moments of P_E and P_D the simulator uses.
- `LayerCosts`: per-layer times from the cost model (`exegpt.cost_model`'s one composition),
  memoised (the search asks for the same operating points many times).
- `encode_times` / `decode_times` / `traverse`: a batch's time in each pipeline stage, and one
  batch through every stage in order. How devices form stages and how layers are divided
  over them is `exegpt.placement` (`stage_groups`, `build_stages`).
- `TimelineEvent`: one busy interval of one device, for plots and tests.

Expected workload of a batch (the paper's "expected encoding / decoding workload"):
- an encode batch of B_E queries costs `encode_attention_s(B_E, S_att)` with S_att =
  sqrt(E[S^2]) under P_E (attention work grows with S^2, so this keeps its expectation), plus
  `encode_rest_s(B_E * E[S])` (linear in tokens);
- a running decode sequence is length-biased: a sequence of output length S stays S
  iterations, so at a random iteration the batch holds length S with weight S * P_D(S) and its
  position is uniform in 1..S. Its expected position is (E[S^2] + E[S]) / (2 E[S]); the self
  KV length is that position (plus the prompt for decoder-only models) and the cross-attention
  length is E[input].

A prefill (an encode batch) is priced as the profile composes the whole forward it was
reconciled to (exegpt/profile/layer_profile.py): the encoder layers, and for an
encoder-decoder the first output token's decode step (every decoder layer at KV 1 over the
E[input] encoder tokens, with its embedding and LM head), or for a decoder-only model the LM
head of each row's last token. Without that step a T5 prefill of one row was priced at about
two thirds of its whole forward and one of hundreds at about 92%, so a calibration factor
read on small prefills overpriced large ones (docs/measurements.md, Profiling and
calibration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from exegpt.cost_model import CostModel, at_rows, decode_layer_s, encode_layer_s
from exegpt.placement import Stage
from exegpt.serving_overhead import serving_overhead_of
from services.scheduler.problem import WorkloadDistribution

# Expected-length KV reservations keep this much headroom for runs of longer-than-average
# sequences (the paper's "buffer for the runtime adjustment").
KV_HEADROOM = 1.1

GIB = 1024**3


@dataclass(frozen=True)
class WorkloadStats:
    mean_input_tokens: float
    attention_input_tokens: int  # sqrt(E[S_in^2]), rounded
    max_input_tokens: int
    mean_output_tokens: float
    output_p99_tokens: int
    max_output_tokens: int
    running_position_tokens: float  # expected position of a sequence in the running batch
    output_pmf: np.ndarray = field(repr=False)

    @classmethod
    def from_workload(cls, workload: WorkloadDistribution) -> WorkloadStats:
        lengths_in = np.arange(len(workload.input_pmf), dtype=np.float64)
        lengths_out = np.arange(len(workload.output_pmf), dtype=np.float64)
        mean_out = float(np.dot(lengths_out, workload.output_pmf))
        second_out = float(np.dot(lengths_out**2, workload.output_pmf))
        second_in = float(np.dot(lengths_in**2, workload.input_pmf))
        return cls(
            mean_input_tokens=workload.mean_input_tokens,
            attention_input_tokens=max(1, round(math.sqrt(second_in))),
            max_input_tokens=workload.max_input_tokens,
            mean_output_tokens=mean_out,
            output_p99_tokens=workload.output_p99_tokens,
            max_output_tokens=workload.max_output_tokens,
            running_position_tokens=(second_out + mean_out) / (2.0 * mean_out),
            output_pmf=workload.output_pmf,
        )

    @property
    def mean_decode_steps(self) -> float:
        """Decode steps of a mean sequence: its first token comes with its prefill (encoding),
        the rest one a step; at least 1, so rates over it stay finite."""
        return max(1.0, self.mean_output_tokens - 1.0)

    @property
    def p99_decode_steps(self) -> int:
        """Decode steps of the p99-length sequence (0 when it is one token long)."""
        return max(0, self.output_p99_tokens - 1)


@dataclass(frozen=True)
class TimelineEvent:
    device: int
    start_s: float
    end_s: float
    kind: str  # 'encode' | 'decode' | 'transfer' | 'allreduce'
    label: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def clip_window(events: list[TimelineEvent], start_s: float, end_s: float) -> list[TimelineEvent]:
    """The events inside [start_s, end_s), cut at its edges and shifted to start at 0 (a
    steady-state window of a simulation that began with an empty pipeline)."""
    clipped = []
    for event in events:
        if event.end_s <= start_s or event.start_s >= end_s:
            continue
        clipped.append(
            replace(
                event,
                start_s=max(event.start_s, start_s) - start_s,
                end_s=min(event.end_s, end_s) - start_s,
            )
        )
    return clipped


class LayerCosts:
    """Per-layer (compute_s, allreduce_s) at an operating point, memoised."""

    def __init__(self, cost_model: CostModel, stats: WorkloadStats) -> None:
        self.model = cost_model
        self.stats = stats
        self.hidden_bytes = cost_model.shape.hidden_bytes_per_token
        # Host work of the serving path per step (exegpt/serving_overhead.py), if profiled.
        self.overhead = serving_overhead_of(cost_model)
        self._encode: dict[tuple[int, int], tuple[float, float]] = {}
        self._decode: dict[tuple[int, int, int, int], tuple[float, float]] = {}
        self._first_step: dict[tuple[int, int], tuple[float, float]] = {}
        self._misc: dict[tuple[str, int], float] = {}

    def check_tp(self, tp_degree: int) -> None:
        if tp_degree not in self.model.tp_degrees:
            have = ", ".join(str(t) for t in self.model.tp_degrees)
            raise ValueError(f"the profile has no timings for TP degree {tp_degree} (has {have})")

    def encode(self, batch_size: int, tp_degree: int) -> tuple[float, float]:
        key = (batch_size, tp_degree)
        if key not in self._encode:
            self._encode[key] = encode_layer_s(
                self.model,
                batch_size,
                self.stats.attention_input_tokens,
                self.encode_tokens(batch_size),
                tp_degree,
            )
        return self._encode[key]

    def decode(self, batch_size: int, tp_degree: int) -> tuple[float, float]:
        """One decode step of one layer at the running batch's expected KV lengths (a static
        batch's rows, weighted by the steps they run, sit at the same expected position)."""
        self_kv, cross_kv = self.kv_lengths()
        key = (batch_size, tp_degree, self_kv, cross_kv)
        if key not in self._decode:
            self._decode[key] = decode_layer_s(self.model, batch_size, self_kv, cross_kv, tp_degree)
        return self._decode[key]

    def first_step(self, batch_size: int, tp_degree: int) -> tuple[float, float]:
        """One decoder layer's part of an encoder-decoder prefill: the decode step of its first
        output token (KV 1, over the E[input] encoder tokens); (0, 0) for a decoder-only model,
        whose prefill is its layers' encode."""
        if not self.model.shape.is_encoder_decoder:
            return 0.0, 0.0
        key = (batch_size, tp_degree)
        if key not in self._first_step:
            cross_tokens = max(1, round(self.stats.mean_input_tokens))
            self._first_step[key] = decode_layer_s(
                self.model, batch_size, 1, cross_tokens, tp_degree
            )
        return self._first_step[key]

    def kv_lengths(self) -> tuple[int, int]:
        """(self, cross) attention lengths of an average running sequence."""
        position = self.stats.running_position_tokens
        if self.model.shape.is_encoder_decoder:
            return max(1, round(position)), max(1, round(self.stats.mean_input_tokens))
        return max(1, round(position + self.stats.mean_input_tokens)), 0

    def _memo(self, name: str, value: int) -> float:
        key = (name, value)
        if key not in self._misc:
            if name == "transfer":
                self._misc[key] = self.model.transfer_s(value)
            elif name == "embedding":
                self._misc[key] = self.model.embedding_s(value)
            else:
                self._misc[key] = self.model.lm_head_s(value)
        return self._misc[key]

    def transfer_s(self, num_bytes: int) -> float:
        return self._memo("transfer", num_bytes)

    def activation_transfer_s(self, num_tokens: int) -> float:
        return self.transfer_s(num_tokens * self.hidden_bytes)

    def embedding_s(self, num_tokens: int) -> float:
        return self._memo("embedding", num_tokens)

    def lm_head_s(self, num_tokens: int) -> float:
        return self._memo("lm_head", num_tokens)

    def encode_tokens(self, batch_size: int) -> int:
        return max(1, round(batch_size * self.stats.mean_input_tokens))


def stage_weight_bytes(model: CostModel, stage: Stage, *, shared_layers: bool) -> int:
    weights = stage.num_decode_layers * model.decode_layer_weight_bytes(stage.tp_degree)
    if not shared_layers:
        weights += stage.num_encode_layers * model.encode_layer_weight_bytes(stage.tp_degree)
    return weights


def kv_bytes_per_sequence_layer(
    model: CostModel, tp_degree: int, self_kv_tokens: float, cross_kv_tokens: float
) -> float:
    """K/V bytes one sequence keeps in one decoder layer on one device of the TP group."""
    return self_kv_tokens * model.kv_bytes_per_token(
        tp_degree
    ) + cross_kv_tokens * model.cross_kv_bytes_per_token(tp_degree)


def idle_stage_reason(stages: list[Stage]) -> str:
    """'' when every stage holds a layer, else which devices would hold none."""
    for stage in stages:
        if stage.num_encode_layers + stage.num_decode_layers == 0:
            devices = ", ".join(str(d) for d in stage.devices)
            return f"{len(stages)} pipeline stages for too few layers: device {devices} holds none"
    return ""


def memory_reason(memory_bytes_per_device: list[int], capacity_bytes: int) -> str:
    """'' when everything fits, else which device overflows and by how much."""
    worst = max(range(len(memory_bytes_per_device)), key=memory_bytes_per_device.__getitem__)
    if memory_bytes_per_device[worst] <= capacity_bytes:
        return ""
    need_gib = memory_bytes_per_device[worst] / GIB
    return f"device {worst} needs {need_gib:.2f} GiB > {capacity_bytes / GIB:.2f} GiB capacity"


def as_batch(value: float) -> int:
    """An expected batch size as the whole number of sequences the cost model is asked for."""
    return max(1, round(value))


# ---- stage times: a batch through the pipeline, shared by every kind ----------------------

StageTimes = list[tuple[float, float]]  # per stage: (compute_s, allreduce_s)


def encode_times(costs: LayerCosts, stages: list[Stage], batch_size: int) -> StageTimes:
    """Per-stage times of a prefill of `batch_size` rows: each stage's encoder layers, the
    first stage paying the prompt's embedding and the engine's host work, and the first
    token's pass (`first_token_times`) on the stages that hold decoder layers. WAA's encoding
    devices hold none: the decoding devices run that pass (waa.py)."""
    first_token = first_token_times(costs, stages, batch_size)
    times = []
    for index, stage in enumerate(stages):
        compute_s, sync_s = costs.encode(batch_size, stage.tp_degree)
        extra_s = 0.0
        if index == 0:  # the engine's host work for the step is paid where it enters
            extra_s = costs.embedding_s(costs.encode_tokens(batch_size))
            extra_s += costs.overhead.prefill_step_s(batch_size)
        step_s, step_sync_s = first_token[index]
        layers_s = stage.num_encode_layers * compute_s + step_s
        times.append((layers_s + extra_s, stage.num_encode_layers * sync_s + step_sync_s))
    return times


def first_token_times(costs: LayerCosts, stages: list[Stage], batch_size: int) -> StageTimes:
    """Per-stage times of a prefill's first token beyond its encode. Encoder-decoder: every
    decoder layer's first step (`LayerCosts.first_step`), the start tokens' embedding on the
    first stage that holds decoder layers and the LM head on the last, and, past one such
    stage, a hop of the rows' activations into each later one (the decoder's pass is a
    traversal of its own after the encoder's). Decoder-only: the LM head of each row's last
    token on the last stage. Stages without decoder layers (an encoder-decoder's encoding
    devices) pay nothing."""
    shape = costs.model.shape
    times: StageTimes = [(0.0, 0.0)] * len(stages)
    if not shape.is_encoder_decoder:
        if stages:
            times[-1] = (costs.lm_head_s(batch_size), 0.0)
        return times
    decoding = [i for i, stage in enumerate(stages) if stage.num_decode_layers]
    for index in decoding:
        stage = stages[index]
        step_s, step_sync_s = costs.first_step(batch_size, stage.tp_degree)
        extra_s = 0.0
        if index == decoding[0]:
            extra_s += costs.embedding_s(batch_size)  # the decoder's start tokens
        else:
            extra_s += costs.activation_transfer_s(batch_size)
        if index == decoding[-1]:
            extra_s += costs.lm_head_s(batch_size)
        layers_s = stage.num_decode_layers * step_s
        times[index] = (layers_s + extra_s, stage.num_decode_layers * step_sync_s)
    return times


@dataclass(frozen=True)
class PrefillParts:
    """A prefill of the whole model on one device (TP 1) as `encode_times` prices it."""

    encoder_s: float  # the encoder layers (decoder-only: every layer's prefill)
    first_step_s: float  # encoder-decoder: the decoder layers' first step (else 0)
    outside_s: float  # embeddings and the LM head of the first token


def prefill_parts(costs: LayerCosts, batch_size: int) -> PrefillParts:
    """`encode_times` of one whole-model stage at TP 1, by part, without the host work: what
    a calibration compares an engine's measured prefill forwards with."""
    shape = costs.model.shape
    stage = Stage((0,), 1, shape.num_encode_layers, shape.num_decode_layers)
    [(total_s, _)] = encode_times(costs, [stage], batch_size)
    encoder_s = shape.num_encode_layers * costs.encode(batch_size, 1)[0]
    first_step_s = shape.num_decode_layers * costs.first_step(batch_size, 1)[0]
    outside_s = total_s - encoder_s - first_step_s - costs.overhead.prefill_step_s(batch_size)
    return PrefillParts(encoder_s, first_step_s, outside_s)


def decode_times(
    costs: LayerCosts,
    stages: list[Stage],
    batch_size: int,
    live_rows: float | None = None,
) -> StageTimes:
    """Per-stage times of a decode step; `live_rows` (default: the batch) are the sequences
    that still produce a token, each paying the serving overhead's per-token host work."""
    rows = batch_size if live_rows is None else live_rows
    times = []
    for index, stage in enumerate(stages):
        compute_s, sync_s = costs.decode(batch_size, stage.tp_degree)
        extra_s = 0.0
        if index == 0:
            extra_s = costs.embedding_s(batch_size) + costs.overhead.decode_step_s(rows)
        extra_s += costs.lm_head_s(batch_size) if index == len(stages) - 1 else 0.0
        times.append(
            (stage.num_decode_layers * compute_s + extra_s, stage.num_decode_layers * sync_s)
        )
    return times


def decode_times_at(costs: LayerCosts, stages: list[Stage], rows: float) -> StageTimes:
    """Stage times of a decode step of `rows` sequences on average (at least one): linear
    between the whole batch sizes around it; the host work is paid per row as it is."""
    rows = max(1.0, rows)
    return _stage_times_between(
        rows, lambda whole: decode_times(costs, stages, whole, live_rows=rows)
    )


def encode_times_at(costs: LayerCosts, stages: list[Stage], rows: float) -> StageTimes:
    """Stage times of a prefill of `rows` sequences on average (at least one): linear between
    the whole batch sizes around it (exact where a step's cost is affine in its rows)."""
    return _stage_times_between(max(1.0, rows), lambda whole: encode_times(costs, stages, whole))


def _stage_times_between(rows: float, times_of: Callable[[int], StageTimes]) -> StageTimes:
    """Every stage's times at a mean of `rows`, linear between whole batch sizes (`at_rows`)."""
    mixed = at_rows(rows, lambda whole: np.asarray(times_of(whole), dtype=float))
    return [(float(compute_s), float(sync_s)) for compute_s, sync_s in mixed]


def traverse(
    stages: list[Stage],
    times: StageTimes,
    transfer_s: float,
    start_s: float,
    kind: str,
    label: str,
    events: list[TimelineEvent] | None,
) -> float:
    """One batch through every stage in order; returns when it leaves the last stage."""
    now = start_s
    for index, (stage, (compute_s, sync_s)) in enumerate(zip(stages, times, strict=True)):
        if index > 0:
            if events is not None:
                events.extend(
                    TimelineEvent(d, now, now + transfer_s, "transfer", label)
                    for d in stage.devices
                )
            now += transfer_s
        if events is not None:
            events.extend(
                TimelineEvent(d, now, now + compute_s, kind, label) for d in stage.devices
            )
            if sync_s > 0:
                events.extend(
                    TimelineEvent(d, now + compute_s, now + compute_s + sync_s, "allreduce", label)
                    for d in stage.devices
                )
        now += compute_s + sync_s
    return now


def encoder_output_broadcast_s(costs: LayerCosts, num_stages: int, num_tokens: int) -> float:
    """Sending the encoder output of `num_tokens` to every stage's cross-attention after an
    encoding: one hop for an encoder-decoder model on more than one stage, else nothing."""
    if not costs.model.shape.is_encoder_decoder or num_stages < 2:
        return 0.0
    return costs.activation_transfer_s(num_tokens)


def broadcast_events(stages: list[Stage], start_s: float, duration_s: float) -> list[TimelineEvent]:
    """The encoder output's broadcast on the timeline: the stages before the last send it."""
    return [
        TimelineEvent(d, start_s, start_s + duration_s, "transfer", "encoder output")
        for stage in stages[:-1]
        for d in stage.devices
    ]
