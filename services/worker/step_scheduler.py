"""The engine's step scheduler: it owns the queue, the running sequences and the KV block
tables, and turns them into one `StepPlan` at a time.

Admission reserves each request's worst-case blocks (prompt + max_tokens) so a running
sequence never runs out of cache; the tables themselves grow step by step. The running
sequences are split into `num_micro_batches` groups: each group's decode step is independent
of the others', so a pipeline executor can keep one group in every stage at once.

A step that fails as a whole is retried one sequence at a time, so a request that breaks the
model fails alone and the batch goes on. Not thread-safe except `enqueue`, `request_abort`
and `snapshot`: everything else runs on the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from dataclasses import dataclass, field, replace

from exegpt.generation import FinishReason
from exegpt.models.batch import prefill_lengths
from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import BlockAllocator, SequenceKV, num_blocks_needed
from services.worker.config import EngineConfig
from services.worker.modes import ModeView, make_mode
from services.worker.observations import Observations
from services.worker.requests import EngineEvent, EngineRequest, RequestTimings
from services.worker.sampling import RowSampling
from services.worker.step_plan import StepKind, StepPlan, StepResult


@dataclass(eq=False)
class Sequence:
    """An admitted request as the scheduler tracks it."""

    request: EngineRequest
    seq_id: int
    seed: int
    group: int
    reserved_blocks: int
    kv: SequenceKV = field(default_factory=SequenceKV)
    output_token_ids: list[int] = field(default_factory=list)
    admitted_ns: int = 0
    prefill_end_ns: int = 0
    prefill_batch_size: int = 0
    in_flight: bool = False
    aborted: bool = False
    retry_alone: bool = False

    @property
    def prefilled(self) -> bool:
        return self.kv.num_self_tokens > 0


@dataclass(frozen=True)
class Delivery:
    """An event for a request's callback (called by the engine outside any lock)."""

    request: EngineRequest
    event: EngineEvent


@dataclass(frozen=True)
class Snapshot:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_pending_prefill_tokens: int
    num_remaining_decode_tokens: int


class StepScheduler:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, allocator: BlockAllocator
    ) -> None:
        self._config = config
        self._model_config = model_config
        self._allocator = allocator
        self.mode = make_mode(config)
        self._num_groups = self.mode.num_micro_batches
        self._lock = threading.Lock()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._pending_aborts: set[str] = set()
        self._running: list[Sequence] = []
        self._plans: dict[int, list[Sequence]] = {}  # in flight, by step id
        self._busy_groups: dict[int, int] = {}  # group -> step id of its decode in flight
        self._next_group = 0
        self._reserved_blocks = 0
        self._step_ids = itertools.count()
        self._seq_ids = itertools.count()
        self.num_finished = 0
        self.num_aborted = 0
        self._observations = Observations()

    # ---- any thread ----------------------------------------------------------------------

    def enqueue(self, request: EngineRequest) -> int:
        """Queue a request and return how many wait (the caller checks the bound first)."""
        with self._lock:
            self._waiting.append(request)
            return len(self._waiting)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def request_abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.add(request_id)

    def snapshot(self) -> Snapshot:
        with self._lock:
            waiting = list(self._waiting)
            running = list(self._running)
        return Snapshot(
            num_waiting=len(waiting),
            num_running=len(running),
            num_free_blocks=self._allocator.num_free_blocks,
            num_pending_prefill_tokens=sum(len(r.prompt_token_ids) for r in waiting),
            num_remaining_decode_tokens=sum(r.sampling.max_tokens for r in waiting)
            + sum(s.request.sampling.max_tokens - len(s.output_token_ids) for s in running),
        )

    def reserved_blocks_for(self, request: EngineRequest) -> int:
        return num_blocks_needed(
            self._model_config,
            len(request.prompt_token_ids),
            request.sampling.max_tokens,
            self._config.kv_block_size_tokens,
        )

    # ---- the engine thread ---------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._pending_aborts)

    def apply_aborts(self) -> None:
        with self._lock:
            aborts, self._pending_aborts = self._pending_aborts, set()
            if not aborts:
                return
            dropped = [r for r in self._waiting if r.request_id in aborts]
            for request in dropped:
                self._waiting.remove(request)
        self.num_aborted += len(dropped)
        for seq in [s for s in self._running if s.request.request_id in aborts]:
            seq.aborted = True
            self.num_aborted += 1
            if not seq.in_flight:  # else freed when its step comes back
                self._remove(seq)

    def next_plan(self) -> StepPlan | None:
        """The next step to run, or None when nothing can run now."""
        lone = next((s for s in self._running if s.retry_alone and not s.in_flight), None)
        if lone is not None:
            lone.retry_alone = False
            kind = StepKind.DECODE if lone.prefilled else StepKind.PREFILL
            return self._plan(kind, [lone])
        recompute = [s for s in self._running if not (s.prefilled or s.in_flight or s.retry_alone)]
        if recompute:  # after a redeploy: prompt + the tokens already generated
            return self._plan(StepKind.PREFILL, recompute)
        admitted = self._admit()
        if admitted:
            return self._plan(StepKind.PREFILL, admitted)
        if not self.mode.may_decode(self._view()):
            return None
        for offset in range(self._num_groups):
            group = (self._next_group + offset) % self._num_groups
            if group in self._busy_groups:
                continue
            ready = [
                s for s in self._running if s.group == group and s.prefilled and not s.in_flight
            ]
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
                deliveries.append(_failure(seq, error, result.unavailable))
                continue
            deliveries.append(self._advance(seq, result.token_ids[row], now_s, len(seqs)))
        if was_decode:
            self.mode.on_decoded(sum(1 for d in deliveries if d.event.finish_reason is not None))
        if result.error is None:
            self._observations.add_step(seqs, result, was_decode)
        return deliveries

    def set_mode(self, config: EngineConfig) -> None:
        """Form batches by `config`'s kind and control variables from the next step on."""
        self._config = config
        self.mode = make_mode(config)
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
        deliveries = [
            Delivery(r, EngineEvent(r.request_id, [], [], error=message, unavailable=unavailable))
            for r in waiting
        ]
        for seq in list(self._running):
            if not seq.aborted:
                deliveries.append(_failure(seq, message, unavailable))
            self._remove(seq)
        self._plans.clear()
        self._busy_groups.clear()
        return deliveries

    # ---- internals -------------------------------------------------------------------------

    def _view(self) -> ModeView:
        num_prefilling = sum(
            1 for seqs in self._plans.values() for seq in seqs if not seq.prefilled
        )
        return ModeView(len(self._running), num_prefilling, self._config.max_batch_size)

    def _admit(self) -> list[Sequence]:
        """Admit whom the mode chooses, in its order, while KV reservations last."""
        view = self._view()
        limit = self.mode.admission_limit(view)
        if limit <= 0:
            return []
        admitted: list[Sequence] = []
        with self._lock:
            chosen = self.mode.choose(list(self._waiting), limit) if self._waiting else []
            for head in chosen:
                needed = self.reserved_blocks_for(head)
                if needed > self._allocator.num_blocks - self._reserved_blocks:
                    break
                self._waiting.remove(head)
                self._reserved_blocks += needed
                seq = Sequence(
                    request=head,
                    seq_id=next(self._seq_ids),
                    seed=_seed(head),
                    group=self._smallest_group(),
                    reserved_blocks=needed,
                    admitted_ns=time.time_ns(),
                )
                self._running.append(seq)
                admitted.append(seq)
        self.mode.on_admitted(len(admitted), view)
        return admitted

    def _smallest_group(self) -> int:
        sizes = collections.Counter(s.group for s in self._running)
        return min(range(self._num_groups), key=lambda g: sizes[g])

    def _plan(self, kind: StepKind, seqs: list[Sequence]) -> StepPlan:
        block_size = self._config.kv_block_size_tokens
        if kind is StepKind.PREFILL:
            prompts = [s.request.prompt_token_ids for s in seqs]
            prefixes = [list(s.output_token_ids) for s in seqs]
            self_lengths, cross_lengths = prefill_lengths(self._model_config, prompts, prefixes)
            self._allocator.grow([s.kv for s in seqs], block_size, self_lengths, cross_lengths)
            token_ids = tuple(tuple(p) for p in prompts)
            prefix_ids = tuple(tuple(p) for p in prefixes)
        else:
            lengths = [s.kv.num_self_tokens + 1 for s in seqs]
            self._allocator.grow([s.kv for s in seqs], block_size, lengths, None)
            token_ids = tuple((s.output_token_ids[-1],) for s in seqs)
            prefix_ids = tuple(() for _ in seqs)
        plan = StepPlan(
            step_id=next(self._step_ids),
            kind=kind,
            seq_ids=tuple(s.seq_id for s in seqs),
            kv=tuple(_copy_kv(s.kv) for s in seqs),
            token_ids=token_ids,
            prefixes=prefix_ids,
            sampling=tuple(_row_sampling(s) for s in seqs),
        )
        for seq in seqs:
            seq.in_flight = True
        self._plans[plan.step_id] = seqs
        return plan

    def _advance(self, seq: Sequence, token: int, now_s: float, batch_size: int) -> Delivery:
        if not seq.prefilled:
            prompts = [seq.request.prompt_token_ids]
            self_lengths, cross_lengths = prefill_lengths(
                self._model_config, prompts, [seq.output_token_ids]
            )
            seq.kv.num_self_tokens = self_lengths[0]
            seq.kv.num_cross_tokens = cross_lengths[0] if cross_lengths else 0
            seq.prefill_end_ns = time.time_ns()
            seq.prefill_batch_size = batch_size
        else:
            seq.kv.num_self_tokens += 1
        seq.output_token_ids.append(token)
        finish = self._finish_reason(seq, token)
        timings = None
        if finish is not None:
            self._remove(seq)  # early termination: leave at once and free the KV
            self.num_finished += 1
            self._observations.add_lengths(seq.request, len(seq.output_token_ids))
            timings = RequestTimings(
                arrival_ns=seq.request.arrival_ns,
                admitted_ns=seq.admitted_ns,
                prefill_end_ns=seq.prefill_end_ns,
                finished_ns=time.time_ns(),
                prefill_batch_size=seq.prefill_batch_size,
            )
        request = seq.request
        event = EngineEvent(
            request.request_id, [token], [now_s - request.arrival_s], finish, timings=timings
        )
        return _deliver(seq, event)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sampling = seq.request.sampling
        if token == self._model_config.eos_token_id and not sampling.ignore_eos:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= sampling.max_tokens:
            return FinishReason.LENGTH
        return None

    def _remove(self, seq: Sequence) -> None:
        self._allocator.release(seq.kv)
        with self._lock:
            self._running.remove(seq)
            self._reserved_blocks -= seq.reserved_blocks


def _deliver(seq: Sequence, event: EngineEvent) -> Delivery:
    return Delivery(seq.request, event)


def _failure(seq: Sequence, message: str, unavailable: bool = False) -> Delivery:
    event = EngineEvent(seq.request.request_id, [], [], error=message, unavailable=unavailable)
    return Delivery(seq.request, event)


def _seed(request: EngineRequest) -> int:
    seed = request.sampling.seed
    return seed if seed is not None else random.getrandbits(63)


def _row_sampling(seq: Sequence) -> RowSampling:
    sampling = seq.request.sampling
    return RowSampling(sampling.temperature, sampling.top_p, seq.seed, len(seq.output_token_ids))


def _copy_kv(kv: SequenceKV) -> SequenceKV:
    return replace(kv, self_blocks=list(kv.self_blocks), cross_blocks=list(kv.cross_blocks))
