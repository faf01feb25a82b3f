"""The engine's step scheduler: it owns the queue, the running sequences and the KV block
tables, and turns them into one `StepPlan` at a time.

KV blocks are allocated as sequences grow. The engine policy (policies/) orders the queue and
decides whether a request may be admitted; when a step's sequences cannot take their next
blocks, the policy's victims are preempted by recompute: their KV is released and they go to
the head of the queue with their tokens, to be prefilled again with prompt + tokens (their
sampling continues where it stopped, so greedy and seeded output does not change). The
running sequences are split into `num_micro_batches` groups: each group's decode step is
independent of the others', so a pipeline executor can keep one group in every stage at once.

A step that fails as a whole is retried one sequence at a time, so a request that breaks the
model fails alone and the batch goes on. Not thread-safe except `enqueue`, `request_abort`
and `snapshot`: everything else runs on the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import replace

from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import BlockAllocator, num_blocks_needed
from services.worker.chunked import chunk_budget
from services.worker.config import EngineConfig
from services.worker.modes import ModeView, make_mode
from services.worker.observations import Observations
from services.worker.policies import KvState, Load, OutputLengthModel, make_policy
from services.worker.requests import EngineEvent, EngineRequest
from services.worker.sequence import (
    Delivery,
    Sequence,
    Snapshot,
    build_plan,
    deliver,
    failure,
    request_load,
    seed_of,
    with_logprobs,
)
from services.worker.step_plan import StepKind, StepPlan, StepResult

__all__ = ["Delivery", "Sequence", "Snapshot", "StepScheduler"]


class StepScheduler:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, allocator: BlockAllocator
    ) -> None:
        self._config = config
        self._model_config = model_config
        self._allocator = allocator
        self.lengths = OutputLengthModel(config.policy.length_window)
        self.policy = make_policy(config.policy, self.lengths)
        self.mode = make_mode(config, self.policy)
        self._num_groups = self.mode.num_micro_batches
        self._chunks = chunk_budget(config.max_tokens_per_step, model_config.is_encoder_decoder)
        self._lock = threading.Lock()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._preempted: list[Sequence] = []  # the head of the queue, oldest admission first
        self._pending_aborts: set[str] = set()
        self._running: list[Sequence] = []
        self._plans: dict[int, list[Sequence]] = {}  # in flight, by step id
        self._busy_groups: dict[int, int] = {}  # group -> step id of its decode in flight
        self._next_group = 0
        self._step_ids = itertools.count()
        self._seq_ids = itertools.count()
        self.num_finished = 0
        self.num_aborted = 0
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # prompt + generated tokens prefilled again
        self.queue_time_s = 0.0  # summed over admitted requests, arrival to first admission
        self._observations = Observations()

    # ---- any thread ----------------------------------------------------------------------

    def enqueue(self, request: EngineRequest) -> int:
        """Queue a request and return how many wait (the caller checks the bound first)."""
        with self._lock:
            self._waiting.append(request)
            return len(self._waiting)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._preempted)

    def request_abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.add(request_id)

    def snapshot(self) -> Snapshot:
        with self._lock:
            queued = [request_load(r) for r in self._waiting]
            queued += [s.load() for s in self._preempted]
            running = [s.load() for s in self._running]
        return Snapshot.of(
            queued, running, self._allocator.num_free_blocks, self.lengths.expected_remaining
        )

    def max_blocks_for(self, request: EngineRequest) -> int:
        """Blocks the request holds at its longest (it must fit the cache alone)."""
        return self._blocks_at(len(request.prompt_token_ids), request.sampling.max_tokens)

    # ---- the engine thread ---------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._preempted or self._running or self._pending_aborts)

    def apply_aborts(self) -> None:
        with self._lock:
            aborts, self._pending_aborts = self._pending_aborts, set()
            if not aborts:
                return
            dropped = [r for r in self._waiting if r.request_id in aborts]
            for request in dropped:
                self._waiting.remove(request)
            resumable = [s for s in self._preempted if s.request.request_id in aborts]
            self._preempted = [s for s in self._preempted if s not in resumable]
        self.num_aborted += len(dropped) + len(resumable)
        for seq in [s for s in self._running if s.request.request_id in aborts]:
            seq.aborted = True
            self.num_aborted += 1
            if not seq.in_flight:  # else freed when its step comes back
                self._remove(seq)

    def next_plan(self) -> StepPlan | None:
        """The next step to run, or None when nothing can run now."""
        lone = next((s for s in self._running if s.retry_alone and not s.in_flight), None)
        kind = StepKind.DECODE if lone is None or lone.prefilled else self._prefill_kind()
        if kind is StepKind.CHUNK and self._chunks is not None:
            self._chunks.select([lone])
        if lone is not None and self._make_room([lone]):
            lone.retry_alone = False
            return self._plan(kind, [lone])
        makers = [self._prefill_plan, self._decode_plan]
        if self._chunks is not None and self._chunks.decode_turn:
            makers.reverse()  # chunk and decode steps alternate
        for make in makers:
            plan = make()
            if plan is not None:
                if self._chunks is not None:
                    self._chunks.decode_turn = plan.kind is StepKind.CHUNK
                return plan
        return None

    def _prefill_kind(self) -> StepKind:
        return StepKind.PREFILL if self._chunks is None else StepKind.CHUNK

    def _idle_unprefilled(self) -> list[Sequence]:
        return [s for s in self._running if not (s.prefilled or s.in_flight or s.retry_alone)]

    def _prefill_plan(self) -> StepPlan | None:
        """Prefill of recomputed or admitted sequences: whole, or chunks within the budget."""
        if self._chunks is not None:
            pending = self._idle_unprefilled()
            if self._chunks.has_room(pending):
                pending += self._admit()
            rows = self._make_room(self._chunks.select(pending))
            return self._plan(StepKind.CHUNK, rows) if rows else None
        recompute = self._make_room(self._idle_unprefilled())
        if recompute:  # after a redeploy: prompt + the tokens already generated
            return self._plan(StepKind.PREFILL, recompute)
        admitted = self._admit()
        if admitted:
            return self._plan(StepKind.PREFILL, admitted)
        return None

    def _decode_plan(self) -> StepPlan | None:
        if not self.mode.may_decode(self._view()):
            return None
        for offset in range(self._num_groups):
            group = (self._next_group + offset) % self._num_groups
            if group in self._busy_groups:
                continue
            ready = [
                s for s in self._running if s.group == group and s.prefilled and not s.in_flight
            ]
            ready = self._make_room(ready)
            if ready:
                self._next_group = group + 1
                plan = replace(self._plan(StepKind.DECODE, ready), micro_batch=group)
                self._busy_groups[group] = plan.step_id
                return plan
        return None

    def complete(self, result: StepResult) -> list[Delivery]:
        """Apply a step's result: tokens, finishes, failures. Returns the events to deliver."""
        seqs = self._plans.pop(result.step_id, None)
        if seqs is None:  # a step of before fail_all
            return []
        for seq in seqs:
            seq.in_flight = False
        self._busy_groups = {g: s for g, s in self._busy_groups.items() if s != result.step_id}
        was_decode = all(seq.prefilled for seq in seqs)
        if result.error is not None and len(seqs) > 1 and not result.unavailable:
            for seq in seqs:  # find the culprit: each sequence alone
                if seq.aborted:
                    self._remove(seq)
                else:
                    seq.retry_alone = True
            return []
        deliveries: list[Delivery] = []
        now_s = time.monotonic()
        for row, seq in enumerate(seqs):
            if seq.aborted:
                self._remove(seq)
                continue
            error = result.error or result.row_errors[row]
            if error is not None:
                self._remove(seq)
                deliveries.append(failure(seq, error, result.unavailable))
                continue
            if seq.partial_chunk_done():  # an earlier chunk of a prefill: no token yet
                continue
            advanced = self._advance(seq, result.token_ids[row], now_s, len(seqs))
            deliveries.append(with_logprobs(advanced, result, row))
        if was_decode:
            self.mode.on_decoded(sum(1 for d in deliveries if d.event.finish_reason is not None))
        if result.error is None:
            self._observations.add_step(seqs, result, was_decode)
        return deliveries

    def set_mode(self, config: EngineConfig) -> None:
        """Form batches by `config`'s kind and control variables from the next step on."""
        self._config = config
        self.mode = make_mode(config, self.policy)
        self._num_groups = self.mode.num_micro_batches
        for seq in self._running:
            seq.group %= self._num_groups

    def reset_for_recompute(self) -> None:
        """Drop every running sequence's KV (a redeploy replaces the caches) and keep its
        tokens: each is prefilled again with its prompt and what it generated. Call with no
        step in flight."""
        if self._plans:
            raise RuntimeError("steps are in flight")
        for seq in self._running:
            self._allocator.release(seq.kv)
            seq.retry_alone = False
        self._busy_groups.clear()

    def drain_observations(self) -> Observations:
        """What was observed since the last call (lengths, step times), for the scheduler."""
        drained, self._observations = self._observations, Observations()
        return drained

    def fail_all(self, message: str, unavailable: bool = False) -> list[Delivery]:
        """Fail every request, queued or running (the engine is stopping or broken)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            preempted, self._preempted = self._preempted, []
        deliveries = [
            Delivery(r, EngineEvent(r.request_id, [], [], error=message, unavailable=unavailable))
            for r in waiting
        ]
        deliveries += [failure(s, message, unavailable) for s in preempted]
        for seq in list(self._running):
            if not seq.aborted:
                deliveries.append(failure(seq, message, unavailable))
            self._remove(seq)
        self._plans.clear()
        self._busy_groups.clear()
        return deliveries

    # ---- internals: admission and preemption ---------------------------------------------

    def _view(self) -> ModeView:
        num_prefilling = sum(
            1 for seqs in self._plans.values() for seq in seqs if not seq.prefilled
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
                for head in self.mode.choose(list(self._waiting), limit - len(admitted)):
                    load = request_load(head)
                    if not self._fits(load, state):
                        break
                    self._waiting.remove(head)
                    state = _with(state, load)
                    admitted.append(self._new_sequence(head))
        self.mode.on_admitted(len(admitted), view)
        return admitted

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

    # ---- internals: plans and results ----------------------------------------------------

    def _plan(self, kind: StepKind, seqs: list[Sequence]) -> StepPlan:
        """A step of `seqs`, their block tables grown to what it writes."""
        block_size = self._config.kv_block_size_tokens
        step_id = next(self._step_ids)
        plan = build_plan(step_id, kind, seqs, self._model_config, self._allocator, block_size)
        # The step's span links to each request's trace (a step serves many requests).
        links = tuple(s.request.trace_context for s in seqs if s.request.trace_context)
        plan = replace(plan, trace_links=links)
        for seq in seqs:
            seq.in_flight = True
        self._plans[plan.step_id] = seqs
        return plan

    def _advance(self, seq: Sequence, token: int, now_s: float, batch_size: int) -> Delivery:
        finish = seq.take_token(token, self._model_config, batch_size)
        timings = None
        if finish is not None:
            self._remove(seq)  # early termination: leave at once and free the KV
            self.num_finished += 1
            self.lengths.observe(len(seq.output_token_ids))
            self._observations.add_lengths(seq.request, len(seq.output_token_ids))
            timings = seq.timings()
        request = seq.request
        event = EngineEvent(
            request.request_id, [token], [now_s - request.arrival_s], finish, timings=timings
        )
        return deliver(seq, event)

    def _remove(self, seq: Sequence) -> None:
        self._allocator.release(seq.kv)
        with self._lock:
            self._running.remove(seq)


def _with(state: KvState, load: Load) -> KvState:
    """`state` after admitting `load` (its prefill blocks are taken)."""
    free = state.free_blocks - state.prefill_blocks(load)
    return replace(state, free_blocks=free, admitted=(*state.admitted, load))
