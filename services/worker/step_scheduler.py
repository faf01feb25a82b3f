"""The engine's step scheduler: it owns the queue, the running sequences and the KV block
tables, and turns them into one `StepPlan` at a time.

KV blocks are allocated as sequences grow. The engine policy (policies/) orders the queue and
decides whether a request may be admitted; when a step's sequences cannot take their next
blocks, the policy's victims are preempted by recompute: their KV is released and they go to
the head of the queue with their tokens, to be prefilled again with prompt + tokens (their
sampling continues where it stopped, so greedy and seeded output does not change). The
running sequences are split into `num_micro_batches` groups: each group's decode step is
independent of the others', so a pipeline executor can keep one group in every stage at once.
Admission and preemption are in admission.py; with --max-tokens-per-step, decodes and prefill
chunks share steps (chunked.py).

A step that fails as a whole is retried one sequence at a time, so a request that breaks the
model fails alone and the batch goes on. Not thread-safe except `enqueue`, `request_abort`
and `snapshot`: everything else runs on the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction

from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import BlockAllocator
from exegpt.output_lengths import BackfillDeadlines
from services.worker.admission import Admission
from services.worker.chunked import chunk_budget, long_output_budget
from services.worker.config import EngineConfig
from services.worker.modes import make_mode
from services.worker.observations import Observations
from services.worker.policies import OutputLengthModel, make_policy
from services.worker.requests import EngineEvent, EngineRequest
from services.worker.sequence import (
    Delivery,
    QueuedTotals,
    Sequence,
    Snapshot,
    build_plan,
    deliver,
    failure,
    with_logprobs,
)
from services.worker.step_plan import StepKind, StepPlan, StepResult
from services.worker.waiting_queue import WaitingQueue

__all__ = ["Delivery", "Sequence", "Snapshot", "StepScheduler"]


class StepScheduler(Admission):
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
        self._chunks = chunk_budget(
            config.max_tokens_per_step, model_config.is_encoder_decoder, long_output_budget(config)
        )
        self._lock = threading.Lock()
        self._waiting = WaitingQueue()
        self._preempted: list[Sequence] = []  # the head of the queue, oldest admission first
        self._pending_aborts: set[str] = set()
        self._running: list[Sequence] = []
        # In flight, by step id: each step's kind and sequences.
        self._plans: dict[int, tuple[StepKind, list[Sequence]]] = {}
        self._busy_groups: dict[int, int] = {}  # group -> step id of its decode in flight
        self._next_group = 0
        self._step_ids = itertools.count()
        self._steps = Fraction(0)  # the backfill deadlines' clock (admission.py)
        self._backfill_deadlines = BackfillDeadlines()
        self.head_waits: collections.Counter[str] = collections.Counter()  # admission.py
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
        """The queue's load without walking the waiting requests (the queue keeps its sums)."""
        expected = self.lengths.expected_remaining
        with self._lock:
            waiting = QueuedTotals(
                len(self._waiting),
                self._waiting.prompt_tokens,
                self._waiting.expected_decode_tokens(expected),
            )
            preempted = [s.load() for s in self._preempted]
            running = [s.load() for s in self._running]
            prefill_left = sum(s.prefill_left for s in self._running if not s.prefilled)
        return Snapshot.of(
            waiting, preempted, running, self._allocator.num_free_blocks, expected, prefill_left
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
            dropped = [r for r in map(self._waiting.pop, aborts) if r is not None]
            for request in dropped:
                self._backfill_deadlines.forget(request.request_id)
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
            self._chunks.select([lone], self._step_limit())
        if lone is not None and self._make_room([lone]):
            lone.retry_alone = False
            return self._plan(kind, [lone])
        if self._chunks is not None:
            return self._mixed_plan()
        return self._prefill_plan() or self._decode_plan()

    def _prefill_kind(self) -> StepKind:
        return StepKind.PREFILL if self._chunks is None else StepKind.CHUNK

    def _idle_unprefilled(self) -> list[Sequence]:
        return [s for s in self._running if not (s.prefilled or s.in_flight or s.retry_alone)]

    def _prefill_plan(self) -> StepPlan | None:
        """Prefill of whole prompts: recomputed sequences first, else newly admitted ones."""
        recompute = self._make_room(self._idle_unprefilled())
        if recompute:  # after a redeploy: prompt + the tokens already generated
            return self._plan(StepKind.PREFILL, recompute)
        admitted = self._admit()
        return self._plan(StepKind.PREFILL, admitted) if admitted else None

    def _mixed_plan(self) -> StepPlan | None:
        """--max-tokens-per-step (chunked.py): a group's ready decodes and, in the budget they
        leave, chunks of the waiting prefills, in one step."""
        assert self._chunks is not None
        step_max = self._step_limit()
        group, decodes = self._ready_decodes()
        pending = self._idle_unprefilled()
        prefills_wait = bool(pending) or self.num_waiting() > 0
        chunk_turn = not self._chunks.decodes_go_in(len(decodes), prefills_wait, step_max)
        num_decodes = 0 if chunk_turn else len(decodes)
        decoding = any(s.prefilled for s in self._running)  # else prefills go whole
        if self._chunks.has_room(pending, step_max, num_decodes, decoding):
            pending += self._admit()
        elif self._waiting:
            self.head_waits["chunk_budget"] += 1
        chunks = self._chunks.select(pending, step_max, num_decodes, decoding)
        if chunk_turn and chunks:  # else no prefill could start: the decodes go on
            decodes = []
        rows = self._make_room(decodes + chunks)  # a victim leaves the step
        decodes = [s for s in rows if s.prefilled]
        chunks = [s for s in rows if not s.prefilled]
        if not decodes:
            return self._plan(StepKind.CHUNK, chunks) if chunks else None
        return self._group_plan(StepKind.MIXED if chunks else StepKind.DECODE, rows, group)

    def _step_limit(self) -> int:
        """The chunk budget of the step being planned (chunked.py), from the expected outputs
        of the sequences decoding now."""
        assert self._chunks is not None
        return self._chunks.plan_step(self._expected_outputs())

    def _expected_outputs(self) -> Iterator[float]:
        """Lazily, each decoding sequence's expected output (each estimate is a bisection of
        the length model's sorted window and a read of its suffix sums)."""
        for seq in self._running:
            if seq.prefilled:
                yield self._expected_output(
                    len(seq.output_token_ids), seq.request.sampling.max_tokens
                )

    def _expected_output(self, generated: int, max_tokens: int) -> float:
        """A sequence's output tokens in all: those so far plus the expected rest. While the
        length model has too few lengths beyond those so far (a fresh replica, or a sequence
        longer than most seen), those so far alone: the rule rests on what is known, not on
        max_tokens (the worst case admission plans for, which would hand the larger budget
        to short-output traffic on a fresh replica)."""
        total = self.lengths.expected_total(generated, max_tokens)
        return generated if total is None else max(generated + 1.0, total)

    def _decode_plan(self) -> StepPlan | None:
        group, ready = self._ready_decodes()
        return self._group_plan(StepKind.DECODE, ready, group) if ready else None

    def _ready_decodes(self) -> tuple[int, list[Sequence]]:
        """The next group free to decode and its sequences ready to (room made for them)."""
        if not self.mode.may_decode(self._view()):
            return -1, []
        for offset in range(self._num_groups):
            group = (self._next_group + offset) % self._num_groups
            if group in self._busy_groups:
                continue
            ready = [
                s for s in self._running if s.group == group and s.prefilled and not s.in_flight
            ]
            ready = self._make_room(ready)
            if ready:
                return group, ready
        return -1, []

    def _group_plan(self, kind: StepKind, seqs: list[Sequence], group: int) -> StepPlan:
        """A step that advances `group` of the running batch (with any chunks riding along)."""
        self._next_group = group + 1
        plan = replace(self._plan(kind, seqs), micro_batch=group)
        self._busy_groups[group] = plan.step_id
        return plan

    def complete(self, result: StepResult) -> list[Delivery]:
        """Apply a step's result: tokens, finishes, failures. Returns the events to deliver."""
        kind, seqs = self._plans.pop(result.step_id, (None, None))
        if seqs is None:  # a step of before fail_all
            return []
        for seq in seqs:
            seq.in_flight = False
        self._busy_groups = {g: s for g, s in self._busy_groups.items() if s != result.step_id}
        decoded = [seq.prefilled for seq in seqs]  # a mixed step also carries chunks
        if result.error is not None and len(seqs) > 1 and not result.unavailable:
            for seq in seqs:  # find the culprit: each sequence alone
                if seq.aborted:
                    self._remove(seq)
                else:
                    seq.retry_alone = True
            return []
        if result.error is None:  # observed before tokens advance and finished KV is freed
            self._observations.add_handoffs(len(seqs), result)
            if kind in (StepKind.PREFILL, StepKind.DECODE):  # see observations.py
                self._observations.add_step(seqs, result, kind is StepKind.DECODE)
        deliveries: list[Delivery] = []
        now_s = time.monotonic()
        num_finished = 0  # of the rows that decoded
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
            num_finished += decoded[row] and advanced.event.finish_reason is not None
            deliveries.append(with_logprobs(advanced, result, row))
        if any(decoded):
            self.mode.on_decoded(num_finished)
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

    def observe_host_time(self, kind: StepKind, num_rows: int, host_s: float) -> None:
        """The engine's host time of a step beyond its forward (kept for decode steps, the
        ones the serving overhead's decode term prices)."""
        if kind is StepKind.DECODE:
            self._observations.add_host_time(num_rows, host_s)

    def drain_observations(self) -> Observations:
        """What was observed since the last call (lengths, step times), for the scheduler."""
        drained, self._observations = self._observations, Observations()
        return drained

    def fail_all(self, message: str, unavailable: bool = False) -> list[Delivery]:
        """Fail every request, queued or running (the engine is stopping or broken)."""
        with self._lock:
            waiting = self._waiting.take_all()
            self._backfill_deadlines.keep_only(())
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

    # ---- internals: plans and results ----------------------------------------------------

    def _plan(self, kind: StepKind, seqs: list[Sequence]) -> StepPlan:
        """A step of `seqs`, their block tables grown to what it writes."""
        block_size = self._config.kv_block_size_tokens
        step_id = next(self._step_ids)
        # A step of every sequence is a plan of each occupied group (an empty group makes
        # none); a plan advances the groups of its sequences (a mixed plan's chunks too).
        occupied = {s.group for s in self._running}
        advanced = len({s.group for s in seqs} & occupied)
        self._steps += min(Fraction(1), Fraction(max(1, advanced), max(1, len(occupied))))
        plan = build_plan(step_id, kind, seqs, self._model_config, self._allocator, block_size)
        # The step's span links to each request's trace (a step serves many requests).
        links = tuple(s.request.trace_context for s in seqs if s.request.trace_context)
        plan = replace(plan, trace_links=links)
        for seq in seqs:
            seq.in_flight = True
        self._plans[plan.step_id] = (plan.kind, seqs)
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
            request.request_id, [token], [now_s - request.arrival_s], finish, timings=timings,
            queue_s=seq.admitted_s - request.arrival_s,
        )  # fmt: skip
        return deliver(seq, event)

    def _remove(self, seq: Sequence) -> None:
        self._allocator.release(seq.kv)
        with self._lock:
            self._running.remove(seq)
