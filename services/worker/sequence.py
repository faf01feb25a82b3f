"""The step scheduler's records: an admitted request (`Sequence`), an event to deliver, the
queue snapshot for stats, and the small conversions from them to a step's rows."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from exegpt.generation import FinishReason
from exegpt.models.batch import prefill_lengths
from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import BlockAllocator, SequenceKV
from services.worker.policies import Load
from services.worker.requests import EngineEvent, EngineRequest, RequestTimings
from services.worker.sampling import RowSampling
from services.worker.step_plan import StepKind, StepPlan, StepResult


@dataclass(eq=False)
class Sequence:
    """An admitted request as the scheduler tracks it. A preempted one keeps its tokens,
    seed and id and waits at the head of the queue without KV until it is recomputed."""

    request: EngineRequest
    seq_id: int
    seed: int
    group: int
    kv: SequenceKV = field(default_factory=SequenceKV)
    output_token_ids: list[int] = field(default_factory=list)
    admitted_ns: int = 0
    admitted_s: float = field(default_factory=time.monotonic)
    prefill_end_ns: int = 0
    prefill_batch_size: int = 0
    in_flight: bool = False
    aborted: bool = False
    retry_alone: bool = False
    num_preemptions: int = 0
    # Chunked prefill (decoder-only): prefill tokens its earlier chunks cached, and where the
    # chunk planned next (or in flight) ends; 0: none.
    num_chunked: int = 0
    chunk_end: int = 0

    @property
    def prefilled(self) -> bool:
        return self.kv.num_self_tokens > 0

    @property
    def prefill_tokens(self) -> int:
        """Decoder tokens its (re)prefill stores: the prompt and what it has generated."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def chunk_start(self) -> int:
        """Prefill tokens already cached by its chunks (0 once its KV was released)."""
        return self.num_chunked if self.kv.self_blocks and not self.prefilled else 0

    @property
    def prefill_left(self) -> int:
        """Prefill tokens its chunks have yet to store."""
        return self.prefill_tokens - self.chunk_start

    def next_step_tokens(self) -> tuple[int, int]:
        """(prompt, generated) tokens whose blocks its next step needs: a chunk's only
        reach its end."""
        if self.chunk_end and not self.prefilled:
            return self.chunk_end, 1
        return len(self.request.prompt_token_ids), len(self.output_token_ids) + 1

    def partial_chunk_done(self) -> bool:
        """After a step of it: True when it was a chunk before the prefill's last (its
        token is dropped: no token comes from the middle of a prompt)."""
        end, self.chunk_end = self.chunk_end, 0
        if self.prefilled or not 0 < end < self.prefill_tokens:
            return False
        self.num_chunked = end
        return True

    def take_token(self, token: int, config: ModelConfig, batch_size: int) -> FinishReason | None:
        """Record a sampled token (and the KV it implies); the finish it brings, if any."""
        if not self.prefilled:
            self_lengths, cross_lengths = prefill_lengths(
                config, [self.request.prompt_token_ids], [self.output_token_ids]
            )
            self.kv.num_self_tokens = self_lengths[0]
            self.kv.num_cross_tokens = cross_lengths[0] if cross_lengths else 0
            if not self.prefill_end_ns:  # the first prefill (a recompute is not the TTFT)
                self.prefill_end_ns = time.time_ns()
                self.prefill_batch_size = batch_size
        else:
            self.kv.num_self_tokens += 1
        self.output_token_ids.append(token)
        return self.finish_reason(token, config.eos_token_id)

    def finish_reason(self, token: int, eos_token_id: int | None) -> FinishReason | None:
        sampling = self.request.sampling
        if token == eos_token_id and not sampling.ignore_eos:
            return FinishReason.STOP
        if token in sampling.stop_token_ids:
            return FinishReason.STOP
        if len(self.output_token_ids) >= sampling.max_tokens:
            return FinishReason.LENGTH
        return None

    def timings(self) -> RequestTimings:
        """Its phases, at its finish."""
        return RequestTimings(
            arrival_ns=self.request.arrival_ns,
            admitted_ns=self.admitted_ns,
            prefill_end_ns=self.prefill_end_ns,
            finished_ns=time.time_ns(),
            prefill_batch_size=self.prefill_batch_size,
        )

    def load(self) -> Load:
        sampling = self.request.sampling
        return Load(
            len(self.request.prompt_token_ids),
            len(self.output_token_ids),
            sampling.max_tokens,
            self.seq_id,
            self.admitted_s,
        )


@dataclass(frozen=True)
class Delivery:
    """An event for a request's callback (called by the engine outside any lock)."""

    request: EngineRequest
    event: EngineEvent


@dataclass(frozen=True)
class QueuedTotals:
    """The waiting requests in sum (waiting_queue.py keeps them as the queue changes)."""

    num_requests: int
    prompt_tokens: int
    expected_decode_tokens: float


@dataclass(frozen=True)
class Snapshot:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_pending_prefill_tokens: int
    num_remaining_decode_tokens: int

    @classmethod
    def of(
        cls,
        waiting: QueuedTotals,
        preempted: list[Load],
        running: list[Load],
        num_free_blocks: int,
        expected_remaining: Callable[[int, int], float],
        admitted_prefill_tokens: int = 0,
    ) -> Snapshot:
        """The queue's state for stats: the waiting requests' totals, the preempted (queued
        again with their tokens) and running loads. `admitted_prefill_tokens`: the prefill
        tokens the running sequences have yet to store (chunks to go), pending like the
        queued ones'."""
        preempted_prefill = sum(q.prompt_tokens + q.num_generated for q in preempted)
        admitted_decode = sum(
            expected_remaining(x.num_generated, x.max_tokens) for x in preempted + running
        )
        return cls(
            num_waiting=waiting.num_requests + len(preempted),
            num_running=len(running),
            num_free_blocks=num_free_blocks,
            num_pending_prefill_tokens=(
                waiting.prompt_tokens + preempted_prefill + admitted_prefill_tokens
            ),
            num_remaining_decode_tokens=round(waiting.expected_decode_tokens + admitted_decode),
        )


def request_load(request: EngineRequest) -> Load:
    return Load(len(request.prompt_token_ids), 0, request.sampling.max_tokens)


def deliver(seq: Sequence, event: EngineEvent) -> Delivery:
    return Delivery(seq.request, event)


def failure(seq: Sequence, message: str, unavailable: bool = False) -> Delivery:
    event = EngineEvent(seq.request.request_id, [], [], error=message, unavailable=unavailable)
    return Delivery(seq.request, event)


def seed_of(request: EngineRequest) -> int:
    seed = request.sampling.seed
    return seed if seed is not None else random.getrandbits(63)


def row_sampling(seq: Sequence) -> RowSampling:
    """How the sequence samples its next token: the index continues after a preemption, so a
    recomputed request draws the same tokens it would have drawn."""
    sampling = seq.request.sampling
    penalised = sampling.presence_penalty != 0 or sampling.frequency_penalty != 0
    return RowSampling(
        sampling.temperature,
        sampling.top_p,
        seq.seed,
        len(seq.output_token_ids),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        num_logprobs=-1 if sampling.logprobs is None else sampling.logprobs,
        generated=tuple(seq.output_token_ids) if penalised else (),
    )


def with_logprobs(delivery: Delivery, result: StepResult, row: int) -> Delivery:
    """`delivery` with the row's logprobs, where the step returned them."""
    logprob = result.logprobs[row] if row < len(result.logprobs) else None
    if logprob is None:
        return delivery
    return replace(delivery, event=replace(delivery.event, logprobs=[logprob]))


def copy_kv(kv: SequenceKV) -> SequenceKV:
    return replace(kv, self_blocks=list(kv.self_blocks), cross_blocks=list(kv.cross_blocks))


def build_plan(
    step_id: int,
    kind: StepKind,
    seqs: list[Sequence],
    model_config: ModelConfig,
    allocator: BlockAllocator,
    block_size: int,
) -> StepPlan:
    """The plan of one step of `seqs`; grows their block tables to hold what it writes."""
    starts: tuple[int, ...] = ()
    prefix_ids: tuple[tuple[int, ...], ...] = tuple(() for _ in seqs)
    if kind is StepKind.PREFILL:
        prompts = [s.request.prompt_token_ids for s in seqs]
        prefixes = [list(s.output_token_ids) for s in seqs]
        self_lengths, cross_lengths = prefill_lengths(model_config, prompts, prefixes)
        allocator.grow([s.kv for s in seqs], block_size, self_lengths, cross_lengths)
        token_ids = tuple(tuple(p) for p in prompts)
        prefix_ids = tuple(tuple(p) for p in prefixes)
    elif kind in (StepKind.CHUNK, StepKind.MIXED):
        token_ids, starts = _packed_tokens(seqs, allocator, block_size)
    else:
        lengths = [s.kv.num_self_tokens + 1 for s in seqs]
        allocator.grow([s.kv for s in seqs], block_size, lengths, None)
        token_ids = tuple((s.output_token_ids[-1],) for s in seqs)
    return StepPlan(
        step_id=step_id,
        kind=kind,
        seq_ids=tuple(s.seq_id for s in seqs),
        kv=tuple(copy_kv(s.kv) for s in seqs),
        token_ids=token_ids,
        prefixes=prefix_ids,
        sampling=tuple(row_sampling(s) for s in seqs),
        starts=starts,
    )


def _packed_tokens(
    seqs: list[Sequence], allocator: BlockAllocator, block_size: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """The new tokens and start positions of a step of prefill chunks and (MIXED) decodes,
    growing the block tables to hold them. A chunk row holds its tokens
    [chunk_start, chunk_end) of prompt + generated (set by the chunk planner) and samples with
    the whole prefill's index; a decode row holds its last token after its cached K/V."""
    starts = [s.kv.num_self_tokens if s.prefilled else s.chunk_start for s in seqs]
    ends = [
        start + 1 if s.prefilled else s.chunk_end for s, start in zip(seqs, starts, strict=True)
    ]
    for seq, start in zip(seqs, starts, strict=True):
        if not seq.prefilled:
            seq.num_chunked = start  # a stale count from before a release or failure goes
    allocator.grow([s.kv for s in seqs], block_size, ends, None)
    token_ids = tuple(
        (s.output_token_ids[-1],)
        if s.prefilled
        else tuple([*s.request.prompt_token_ids, *s.output_token_ids][start:end])
        for s, start, end in zip(seqs, starts, ends, strict=True)
    )
    return token_ids, tuple(starts)
