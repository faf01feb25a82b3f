"""What a replica observes while it serves, for the scheduler's drift checks and calibration:
the lengths of finished requests, the measured time of each step at each stage, the measured
hand-offs of activations between stages (handoff.py), and the engine's host time of each
decode step beyond its forward (engine_clock.py).

Which steps time which kind: a PREFILL (whole prompts) times the encode, a DECODE the decode.
CHUNK and MIXED steps (chunked prefill) time neither: a chunk attends to the K/V its earlier
chunks cached and a mixed step runs decode rows and chunks in one packed forward, and the
cost model prices neither (an encode is a whole prompt from scratch; summing an encode and a
decode part would count the forward's fixed cost twice), so their ratios would be noise, not
calibration. Their hand-offs are still activations and are kept."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.worker.requests import EngineRequest
from services.worker.step_plan import StepResult

if TYPE_CHECKING:
    from services.worker.step_scheduler import Sequence

MAX_KEPT = 4096  # per kind between two reports: older ones are dropped, not queued forever


@dataclass(frozen=True)
class StepTime:
    is_decode: bool
    batch_size: int
    num_tokens: int  # prefill: prompt tokens; decode: cached tokens over the batch
    num_cross_tokens: int  # decode of an encoder-decoder model: encoder tokens over the batch
    stage_s: tuple[float, ...]  # each stage's compute, in the order the step passed them


@dataclass(frozen=True)
class Handoff:
    batch_size: int  # the step's sequences
    num_tokens: int  # token rows of the activations handed off
    measured_s: float


@dataclass(frozen=True)
class HostTime:
    batch_size: int  # the decode step's rows
    measured_s: float  # the engine's wall time for the step beyond its forward


@dataclass
class Observations:
    input_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    step_times: list[StepTime] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)
    host_times: list[HostTime] = field(default_factory=list)

    def add_lengths(self, request: EngineRequest, num_output_tokens: int) -> None:
        if len(self.input_tokens) < MAX_KEPT:
            self.input_tokens.append(len(request.prompt_token_ids))
            self.output_tokens.append(num_output_tokens)

    def add_step(self, seqs: Seq[Sequence], result: StepResult, is_decode: bool) -> None:
        if len(self.step_times) >= MAX_KEPT or not result.stage_s:
            return
        if is_decode:
            num_tokens = sum(s.kv.num_self_tokens for s in seqs)
            num_cross_tokens = sum(s.kv.num_cross_tokens for s in seqs)
        else:
            num_tokens = sum(len(s.request.prompt_token_ids) for s in seqs)
            num_cross_tokens = 0
        self.step_times.append(
            StepTime(is_decode, len(seqs), num_tokens, num_cross_tokens, result.stage_s)
        )

    def add_handoffs(self, batch_size: int, result: StepResult) -> None:
        for num_tokens, measured_s in result.handoffs:
            if len(self.handoffs) < MAX_KEPT:
                self.handoffs.append(Handoff(batch_size, num_tokens, measured_s))

    def add_host_time(self, batch_size: int, host_s: float) -> None:
        if len(self.host_times) < MAX_KEPT and batch_size >= 1 and host_s > 0:
            self.host_times.append(HostTime(batch_size, host_s))
