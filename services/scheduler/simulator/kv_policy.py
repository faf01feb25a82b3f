"""The engine's KV policies simulated step by step: how often fcfs and memory_aware preempt
under a KV budget, before a replica runs them.

The simulation follows the worker's step scheduler at the granularity of KV blocks, with
the same rules:
- KV blocks are allocated as sequences grow (a prefill takes the blocks of its prompt plus
  the tokens it already generated; each decode step may take one more block).
- Admission resumes the preempted first (oldest admission first), then the waiting queue in
  arrival order, up to `max_batch_size` running. A request alone in an idle engine only
  needs its prefill to fit; otherwise it needs the watermark (1% of the cache) free beyond
  its prefill, and memory_aware also needs the predicted peak KV of everything admitted to
  fit (each sequence predicted to reach the `length_quantile` of the output lengths seen
  beyond what it generated, capped by its max_tokens; max_tokens until enough finished).
- A decode that finds no free block preempts the newest running sequence (itself, when it
  is the newest) by recompute: its blocks are freed, it waits at the head of the queue with
  its tokens, and its prompt + tokens are prefilled again when it is readmitted.
- memory_aware with `backfill=True` (off by default, as in the engine): when the head of the
  waiting queue does not fit, a request behind it (among the next BACKFILL_WINDOW) that
  fits is admitted if its predicted output ends by the step the head was predicted to fit
  when it first blocked
  (exegpt/output_lengths: predicted_start_step, BackfillDeadlines, never extended,
  within_backfill); in strict order once that step passed.

It predicts counts (preemptions, recomputed tokens, steps), not times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from exegpt.models.kv_cache import blocks_for
from exegpt.output_lengths import (
    BACKFILL_WINDOW,
    BackfillDeadlines,
    OutputLengthModel,
    predicted_peak_blocks,
    predicted_start_step,
    within_backfill,
)

KV_POLICIES = ("fcfs", "memory_aware")


@dataclass(frozen=True)
class SimRequest:
    prompt_tokens: int
    output_tokens: int  # what it will generate (its true length)
    max_tokens: int
    arrival_step: int = 0


@dataclass(frozen=True)
class KvPolicyResult:
    policy: str
    num_preemptions: int
    num_recomputed_tokens: int
    num_steps: int
    peak_blocks_used: int
    first_admitted_steps: tuple[int, ...] = ()  # by request, the step it was first admitted


@dataclass(eq=False)
class _Seq:
    request: SimRequest
    seq_id: int
    generated: int = 0
    blocks: int = 0
    first_admitted: int = -1  # the step it was first admitted at; -1: not yet


@dataclass
class _Engine:
    policy: str
    num_blocks: int
    block_size_tokens: int
    max_batch_size: int
    length_quantile: float
    lengths: OutputLengthModel
    backfill: bool = False
    free: int = 0
    step: int = 0  # the simulation's clock
    deadlines: BackfillDeadlines = field(default_factory=BackfillDeadlines)
    running: list[_Seq] = field(default_factory=list)
    preempted: list[_Seq] = field(default_factory=list)
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    peak_used: int = 0

    def blocks_at(self, prompt_tokens: int, num_generated: int) -> int:
        """Blocks of a decoder-only sequence after it generated `num_generated` tokens (the
        last token's K/V is never written)."""
        return blocks_for(prompt_tokens + max(num_generated, 1) - 1, self.block_size_tokens)

    @property
    def watermark(self) -> int:
        return max(1, math.ceil(0.01 * self.num_blocks))

    def fits(self, seq: _Seq, admitted: list[_Seq]) -> bool:
        prefill = self.blocks_at(seq.request.prompt_tokens, seq.generated + 1)
        if not admitted:
            return prefill <= self.free
        if prefill + self.watermark > self.free:
            return False
        if self.policy == "fcfs":
            return True
        sequences = [self._prediction(s) for s in [*admitted, seq]]
        return predicted_peak_blocks(sequences, self.blocks_at) <= self.num_blocks - self.watermark

    def _prediction(self, seq: _Seq) -> tuple[int, int, int]:
        request = seq.request
        total = self.lengths.quantile(self.length_quantile, seq.generated, request.max_tokens)
        return request.prompt_tokens, seq.generated, max(0, total - seq.generated)

    def admit(self, waiting: list[_Seq]) -> list[_Seq]:
        """Resume the preempted, then admit the waiting (only once none is preempted), while
        the policy allows."""
        admitted: list[_Seq] = []
        while len(self.running) < self.max_batch_size:
            resumed = bool(self.preempted)
            queue = self.preempted if resumed else waiting
            if not queue or not self.fits(queue[0], self.running):
                break
            seq = queue.pop(0)
            if resumed:
                self.num_recomputed_tokens += seq.request.prompt_tokens + seq.generated
            else:
                self.deadlines.forget(seq.seq_id)  # the head, admitted
            self._start(seq, admitted)
        if waiting and not self.preempted and len(self.running) < self.max_batch_size:
            self._backfill(waiting, admitted)  # the head does not fit
        return admitted

    def _start(self, seq: _Seq, admitted: list[_Seq]) -> None:
        self._grow(seq, seq.generated + 1)  # the prefill samples the next token
        if seq.first_admitted < 0:
            seq.first_admitted = self.step
        self.running.append(seq)
        admitted.append(seq)

    def _backfill(self, waiting: list[_Seq], admitted: list[_Seq]) -> None:
        """memory_aware's backfill: admit the requests among the BACKFILL_WINDOW behind the
        blocked head `waiting[0]` that fit and are predicted to finish by the step the head
        was predicted to fit when it first blocked (its deadline, never extended)."""
        if self.policy != "memory_aware" or not self.backfill:
            return
        deadline = self.deadlines.of(
            waiting[0].seq_id,
            self.step,
            lambda: predicted_start_step(
                [self._prediction(s) for s in self.running],
                self._prediction(waiting[0]),
                self.num_blocks - self.watermark,
                self.blocks_at,
            ),
        )
        for seq in waiting[1 : 1 + BACKFILL_WINDOW]:  # a copy: admitted ones leave `waiting`
            if len(self.running) >= self.max_batch_size:
                return
            left = self._prediction(seq)[2]
            if within_backfill(self.step, left, deadline) and self.fits(seq, self.running):
                waiting.remove(seq)
                self._start(seq, admitted)

    def decode(self, seq: _Seq) -> None:
        """One decode step of `seq`, preempting the newest sequences while blocks run out."""
        while self.blocks_at(seq.request.prompt_tokens, seq.generated + 1) - seq.blocks > (
            self.free
        ):
            victim = max(self.running, key=lambda s: s.seq_id)
            self.preempt(victim)
            if victim is seq:
                return
        self._grow(seq, seq.generated + 1)

    def preempt(self, seq: _Seq) -> None:
        self.free += seq.blocks
        seq.blocks = 0
        self.running.remove(seq)
        self.preempted.append(seq)
        self.preempted.sort(key=lambda s: s.seq_id)
        self.num_preemptions += 1

    def finish_done(self) -> None:
        for seq in [s for s in self.running if s.generated >= s.request.output_tokens]:
            self.free += seq.blocks
            self.running.remove(seq)
            self.lengths.observe(seq.generated)

    def _grow(self, seq: _Seq, generated: int) -> None:
        needed = self.blocks_at(seq.request.prompt_tokens, generated)
        self.free -= needed - seq.blocks
        seq.blocks, seq.generated = needed, generated
        self.peak_used = max(self.peak_used, self.num_blocks - self.free)


def simulate_kv_policy(
    requests: Sequence[SimRequest],
    policy: str,
    num_blocks: int,
    block_size_tokens: int = 16,
    max_batch_size: int = 64,
    length_quantile: float = 0.95,
    min_samples: int = 8,
    backfill: bool = False,
) -> KvPolicyResult:
    """Run `requests` (in arrival order) under `policy` with a cache of `num_blocks`."""
    if policy not in KV_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(KV_POLICIES)}, not {policy!r}")
    engine = _Engine(
        policy,
        num_blocks,
        block_size_tokens,
        max_batch_size,
        length_quantile,
        OutputLengthModel(min_samples=min_samples),
        backfill,
        free=num_blocks,
    )
    for request in requests:
        if not 1 <= request.output_tokens <= request.max_tokens:
            raise ValueError("each request needs 1 <= output_tokens <= max_tokens")
        if engine.blocks_at(request.prompt_tokens, request.max_tokens) > num_blocks:
            raise ValueError(f"a request needs more than the cache's {num_blocks} blocks")
    seqs = [_Seq(r, i) for i, r in enumerate(requests)]
    pending = sorted(seqs, key=lambda s: s.request.arrival_step)
    waiting: list[_Seq] = []
    step = 0
    while pending or waiting or engine.running or engine.preempted:
        while pending and pending[0].request.arrival_step <= step:
            waiting.append(pending.pop(0))
        engine.step = step
        admitted = engine.admit(waiting)
        for seq in sorted(engine.running, key=lambda s: s.seq_id):
            if seq not in admitted and seq in engine.running:
                engine.decode(seq)
        engine.finish_done()
        step += 1
    return KvPolicyResult(
        policy,
        engine.num_preemptions,
        engine.num_recomputed_tokens,
        step,
        engine.peak_used,
        tuple(s.first_admitted for s in seqs),
    )
