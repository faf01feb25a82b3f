"""The contract between the engine's step scheduler and an executor: one plan per step, data
only, and the result it comes back as (in the spirit of vLLM v1's SchedulerOutput).

The scheduler decides everything (which sequences, prefill or decode, their block tables,
how each samples); an executor only carries a plan out, in this process or over pipeline
stages, and never allocates or chooses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from exegpt.generation import TokenLogprob
from exegpt.models.batch import BatchBuilder, DecodeBatch, PackedBatch, PrefillBatch
from exegpt.models.kv_cache import SequenceKV
from services.worker.sampling import RowSampling


class StepKind(enum.StrEnum):
    PREFILL = "prefill"  # fresh sequences: prompt (+ tokens to recompute) into the KV cache
    DECODE = "decode"  # one more token for sequences already prefilled
    # Decoder-only prefill chunks (--max-tokens-per-step): each row continues its sequence's
    # prefill after the K/V its earlier chunks cached; it runs like a decode of T tokens.
    CHUNK = "chunk"
    # Decodes and prefill chunks in one packed step (--max-tokens-per-step, decoder-only).
    MIXED = "mixed"


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    kind: StepKind
    seq_ids: tuple[int, ...]
    # Block tables and stored-token counts before the step; the tables already hold every
    # block the step writes.
    kv: tuple[SequenceKV, ...]
    # PREFILL: each prompt; DECODE: each sequence's last token, alone; CHUNK: each chunk;
    # MIXED: a decode row's last token or a chunk row's chunk.
    token_ids: tuple[tuple[int, ...], ...]
    # PREFILL: tokens a preempted sequence had generated (recomputed); DECODE: empty.
    prefixes: tuple[tuple[int, ...], ...]
    sampling: tuple[RowSampling, ...]
    # DECODE: the group of the running batch this step advances (-1: a prefill).
    micro_batch: int = -1
    # The trace context of each request in the step (OpenTelemetry SpanContexts), so the
    # step's span can link to the requests it served.
    trace_links: tuple[Any, ...] = ()
    # CHUNK, MIXED: the tokens each row's KV holds before the step (where its tokens start).
    starts: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.seq_ids)

    def batch(self, builder: BatchBuilder) -> PrefillBatch | DecodeBatch | PackedBatch:
        """The step's index tensors (token ids and KV slots)."""
        if self.kind is StepKind.PREFILL:
            prompts = [list(t) for t in self.token_ids]
            return builder.prefill(self.kv, prompts, [list(p) for p in self.prefixes])
        if self.kind in (StepKind.CHUNK, StepKind.MIXED):
            return builder.packed(self.kv, [list(t) for t in self.token_ids], list(self.starts))
        return builder.decode(self.kv, [t[0] for t in self.token_ids])


@dataclass(frozen=True)
class StepResult:
    step_id: int
    token_ids: tuple[int, ...]  # one per row; -1 where the row failed
    row_errors: tuple[str | None, ...]
    # The whole step failed (no row has a token). `unavailable`: the executor itself is broken
    # (a stage died), so the replica cannot serve; otherwise the step's own input failed.
    error: str | None = None
    unavailable: bool = False
    compute_s: float = 0.0
    # Compute time of each stage the step passed through, in order (one: in process).
    stage_s: tuple[float, ...] = ()
    # Time inside the model call alone (no batch building, no sampling); 0: not measured
    # apart from compute_s (the engine's clock then charges compute_s as the forward).
    forward_s: float = 0.0
    # Measured hand-offs of activations between its stages: (tokens, seconds) each
    # (services/worker/handoff.py; none in process).
    handoffs: tuple[tuple[int, float], ...] = ()
    # Per row, where its sampling asked for them: the token's logprob and alternatives.
    logprobs: tuple[TokenLogprob | None, ...] = ()

    @classmethod
    def failed(cls, plan: StepPlan, error: str, unavailable: bool = False) -> StepResult:
        return cls(plan.step_id, (-1,) * len(plan), (None,) * len(plan), error, unavailable)
