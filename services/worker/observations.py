"""What a replica observes while it serves, for the scheduler's drift checks and calibration:
the lengths of finished requests and the measured time of each step at each stage."""

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


@dataclass
class Observations:
    input_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    step_times: list[StepTime] = field(default_factory=list)

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
