"""The step scheduler's admission and preemption: whom to admit from the queue while the
engine policy allows, and whom to preempt by recompute when a step's sequences cannot take
their next KV blocks. A part of `StepScheduler` (step_scheduler.py), which owns the state."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import replace
from fractions import Fraction

from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import BlockAllocator, num_blocks_needed
from exegpt.output_lengths import BACKFILL_WINDOW, BackfillDeadlines, within_backfill
from services.worker.config import EngineConfig
from services.worker.modes import ModeView, ScheduleMode
from services.worker.policies import BasePolicy, KvState, Load
from services.worker.requests import EngineRequest
from services.worker.sequence import Sequence, request_load, seed_of
from services.worker.step_plan import StepKind
from services.worker.waiting_queue import WaitingQueue


class Admission:
    """Admission and preemption over the scheduler's queue and running sequences."""

    _config: EngineConfig
    _model_config: ModelConfig
    _allocator: BlockAllocator
    _lock: threading.Lock
    _waiting: WaitingQueue
    _preempted: list[Sequence]
    _running: list[Sequence]
    _plans: dict[int, tuple[StepKind, list[Sequence]]]
    _seq_ids: itertools.count
    _num_groups: int
    _steps: Fraction  # plans made so far, each 1 / occupied groups: the deadlines' clock
    _backfill_deadlines: BackfillDeadlines
    mode: ScheduleMode
    policy: BasePolicy
    num_preemptions: int
    num_recomputed_tokens: int
    queue_time_s: float
    # Calls in which a request offered could not start (the first refusal of a call), by
    # cause: "free_blocks"
    # (its prefill and the watermark exceed the free blocks), "policy" (the policy refused
    # it: memory_aware's predicted peak), "batch" (no admission slot), "preempted" (the
    # preempted resume first), "chunk_budget" (chunked prefill left no room this step).
    head_waits: collections.Counter[str]

    def _view(self) -> ModeView:
        num_prefilling = sum(
            1 for _, seqs in self._plans.values() for seq in seqs if not seq.prefilled
        )
        return ModeView(len(self._running), num_prefilling, self._config.max_batch_size)

    def _blocks_at(self, prompt_tokens: int, num_generated: int) -> int:
        block_size = self._config.kv_block_size_tokens
        return num_blocks_needed(self._model_config, prompt_tokens, num_generated, block_size)

    def _kv_state(self) -> KvState:
        return KvState(
            self._allocator.num_blocks,
            self._allocator.num_free_blocks,
            tuple(s.load() for s in self._running),
            self._blocks_at,
        )

    def _fits(self, load: Load, state: KvState) -> bool:
        """The policy's admission check; alone in an idle engine, only its prefill must fit."""
        if not state.admitted:
            return state.prefill_blocks(load) <= state.free_blocks
        return self.policy.can_admit(load, state)

    def _admit(self) -> list[Sequence]:
        """Resume the preempted, then admit whom the mode chooses, while the policy allows."""
        view = self._view()
        limit = self.mode.admission_limit(view)
        if limit <= 0:
            self._count_head_wait("batch")
            return []
        state = self._kv_state()
        admitted: list[Sequence] = []
        with self._lock:
            while self._preempted and len(admitted) < limit:
                seq = self._preempted[0]
                if not self._fits(seq.load(), state):
                    break
                self._preempted.pop(0)
                state = _with(state, seq.load())
                self.num_recomputed_tokens += seq.load().prompt_tokens + len(seq.output_token_ids)
                seq.group = self._smallest_group()
                self._running.append(seq)
                admitted.append(seq)
            if self._waiting and not self._preempted and len(admitted) < limit:
                admitted += self._admit_waiting(limit - len(admitted), state)
            if self._preempted:
                self._count_head_wait("preempted")
        self.mode.on_admitted(len(admitted), view)
        return admitted

    def _admit_waiting(self, limit: int, state: KvState) -> list[Sequence]:
        """Admit up to `limit` of the mode's candidates in order while they fit. Past the
        first that does not, read on only to backfill: at most BACKFILL_WINDOW more, and only
        before its deadline (without backfill the deadline is now: strict order)."""
        admitted: list[Sequence] = []
        taken: list[EngineRequest] = []  # out of the queue after the walk, which reads it
        try:
            self._walk(limit, state, admitted, taken)
        finally:
            for head in taken:  # even if the walk raised: none is admitted twice
                self._waiting.remove(head)
        return admitted

    def _walk(
        self, limit: int, state: KvState, admitted: list[Sequence], taken: list[EngineRequest]
    ) -> None:
        """`_admit_waiting`'s walk: appends to `admitted` and `taken` as it admits."""
        deadline: int | None = None  # once one did not fit: the step to pass it by
        num_behind = 0  # candidates read since one did not fit
        for head in self.mode.choose(self._waiting, limit):
            load = request_load(head)
            if deadline is None:
                if not self._fits(load, state):
                    deadline = self._deadline(head.request_id, load, state)
                    self.head_waits[_refusal(load, state)] += 1
                    if self._clock() >= deadline:
                        break
                    continue
            else:
                num_behind += 1
                if num_behind > BACKFILL_WINDOW:
                    break
                if not self._passes(load, deadline, state):
                    continue
            admitted.append(self._new_sequence(head))
            taken.append(head)  # running now: it leaves the queue whatever follows
            self._backfill_deadlines.forget(head.request_id)
            state = _with(state, load)
            if len(admitted) == limit:
                break  # before reading the next

    def _count_head_wait(self, cause: str) -> None:
        if self._waiting:
            self.head_waits[cause] += 1

    def _clock(self) -> int:
        """Engine steps so far: one step of every running sequence is a plan of each occupied
        micro-batch group (an empty group makes none), and a plan counts for the groups its
        sequences are in (a mixed plan's chunks advance theirs). Prefill plans count too, so
        the clock runs no slower than the sequences' steps and a deadline comes no later
        than predicted."""
        return int(self._steps)  # exact: 1/3 + 1/3 + 1/3 is a step

    def _deadline(self, request_id: str, load: Load, state: KvState) -> int:
        """The step by which the blocked request `load` was predicted to fit when it first
        blocked (the policy's backfill steps from then; 0, now, without backfill), kept
        until it is admitted and never extended."""
        return self._backfill_deadlines.of(
            request_id, self._clock(), lambda: self.policy.backfill_steps(load, state)
        )

    def _passes(self, load: Load, deadline: int, state: KvState) -> bool:
        """Whether `load` may be admitted before a request ahead that did not fit: it fits
        and is predicted to finish by that request's `deadline` (`within_backfill`): its
        predicted output tokens, one a step, the first with the prefill, plus the further
        steps a chunked prefill takes at --max-tokens-per-step tokens a step (the fixed
        budget: fewer when decodes share the step, more under a long-output budget)."""
        chunk = self._config.max_tokens_per_step
        extra = 0 if chunk is None else -(-load.prompt_tokens // chunk) - 1
        steps = self.policy.predicted_left(load) + extra
        return within_backfill(self._clock(), steps, deadline) and self._fits(load, state)

    def _new_sequence(self, request: EngineRequest) -> Sequence:
        seq = Sequence(
            request=request,
            seq_id=next(self._seq_ids),
            seed=seed_of(request),
            group=self._smallest_group(),
            admitted_ns=time.time_ns(),
        )
        self.queue_time_s += seq.admitted_s - request.arrival_s
        self._running.append(seq)
        return seq

    def _make_room(self, seqs: list[Sequence]) -> list[Sequence]:
        """Preempt the policy's victims until `seqs` can take the blocks their next step
        writes. Returns those of `seqs` still to plan (a victim among them leaves it)."""
        seqs = list(seqs)
        while seqs and self._blocks_short(seqs) > 0:
            candidates = [
                s
                for s in self._running
                if not (s.in_flight or s.aborted) and (s in seqs or s.kv.self_blocks)
            ]
            if not candidates:
                return []  # the blocks come back with the steps in flight
            chosen = self.mode.victim([s.load() for s in candidates])
            victim = next(s for s in candidates if s.seq_id == chosen.seq_id)
            self._preempt(victim)
            if victim in seqs:
                seqs.remove(victim)
        return seqs

    def _blocks_short(self, seqs: list[Sequence]) -> int:
        """Blocks the next step of `seqs` needs beyond the free ones."""
        needed = 0
        for seq in seqs:
            held = len(seq.kv.self_blocks) + len(seq.kv.cross_blocks)
            needed += max(0, self._blocks_at(*seq.next_step_tokens()) - held)
        return needed - self._allocator.num_free_blocks

    def _preempt(self, seq: Sequence) -> None:
        """Release the sequence's KV; it waits at the head of the queue with its tokens."""
        self._allocator.release(seq.kv)
        seq.retry_alone = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        with self._lock:
            self._running.remove(seq)
            self._preempted.append(seq)
            self._preempted.sort(key=lambda s: s.seq_id)

    def _smallest_group(self) -> int:
        sizes = collections.Counter(s.group for s in self._running)
        return min(range(self._num_groups), key=lambda g: sizes[g])


def _with(state: KvState, load: Load) -> KvState:
    """`state` after admitting `load` (its prefill blocks are taken)."""
    free = state.free_blocks - state.prefill_blocks(load)
    return replace(state, free_blocks=free, admitted=(*state.admitted, load))


def _refusal(load: Load, state: KvState) -> str:
    """Why a request that did not fit was refused: the free blocks, or the policy."""
    needed = state.prefill_blocks(load) + (state.watermark if state.admitted else 0)
    return "free_blocks" if needed > state.free_blocks else "policy"
