"""The engine: one per replica. Queues requests, batches them and runs the model.

It runs on its own thread so the model loop never blocks the gRPC event loop. Callers
`submit()` a request with a callback that receives `EngineEvent`s (tokens, the finish, or an
error) on the engine thread, and `abort()` it when their client goes away.

Admission reserves a request's worst-case KV blocks (prompt + max_tokens), so a running
request never runs out of cache and nothing is preempted; memory-aware policies that
overcommit come with the engine-level scheduler.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exegpt.generation import FinishReason, InvalidRequestError, SamplingParams
from exegpt.models.kv_cache import KVCachePool, SequenceKV, num_blocks_needed
from exegpt.models.runner import ModelRunner
from services.worker.config import BatchingMode, EngineConfig
from services.worker.sampling import make_generator, sample_next_tokens

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The bounded queue is full; the client may retry later (RESOURCE_EXHAUSTED)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests (UNAVAILABLE)."""


@dataclass(frozen=True)
class RequestTimings:
    """Wall-clock stamps (ns since the epoch) of one request's phases, for tracing."""

    arrival_ns: int
    admitted_ns: int
    prefill_end_ns: int
    finished_ns: int
    prefill_batch_size: int


@dataclass(frozen=True)
class EngineEvent:
    request_id: str
    token_ids: list[int]
    token_times_s: list[float]
    finish_reason: FinishReason | None = None
    error: str | None = None
    timings: RequestTimings | None = None  # set with the finish


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    on_event: Callable[[EngineEvent], None]
    arrival_s: float = field(default_factory=time.monotonic)
    arrival_ns: int = field(default_factory=time.time_ns)
    output_token_ids: list[int] = field(default_factory=list)
    reserved_blocks: int = 0
    kv: SequenceKV | None = None
    generator: torch.Generator | None = None
    admitted_ns: int = 0
    prefill_end_ns: int = 0
    prefill_batch_size: int = 0
    finished: bool = False


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_used_bytes: int
    kv_capacity_bytes: int
    kv_num_free_blocks: int
    kv_num_blocks: int
    num_finished: int
    num_aborted: int
    batching: str
    num_pending_prefill_tokens: int
    num_remaining_decode_tokens: int


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        pool: KVCachePool,
        config: EngineConfig,
        *,
        eos_token_id: int,
        vocab_size: int,
        max_context_tokens: int,
    ) -> None:
        self._runner = runner
        self._pool = pool
        self._config = config
        self._eos_token_id = eos_token_id
        self._vocab_size = vocab_size
        self._max_context_tokens = max_context_tokens
        self._model_config = runner.model.config
        self._lock = threading.Condition()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._pending_aborts: set[str] = set()
        self._running: list[EngineRequest] = []
        self._reserved_blocks = 0
        self._num_finished = 0
        self._num_aborted = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ---- called from other threads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the current step; requests still queued or running get an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout_s)

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; raises InvalidRequestError, QueueFullError or EngineStoppedError."""
        self._validate(request)
        request.reserved_blocks = num_blocks_needed(
            self._model_config,
            len(request.prompt_token_ids),
            request.sampling.max_tokens,
            self._pool.block_size_tokens,
        )
        if request.reserved_blocks > self._pool.num_blocks:
            raise InvalidRequestError(
                f"request needs {request.reserved_blocks} KV blocks at its longest but the "
                f"cache holds {self._pool.num_blocks}; shorten the prompt or max_tokens"
            )
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("engine is shutting down")
            if len(self._waiting) >= self._config.max_queue_size:
                raise QueueFullError(
                    f"request queue is full ({self._config.max_queue_size} waiting); retry later"
                )
            self._waiting.append(request)
            self._lock.notify_all()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); frees its KV at the next step."""
        with self._lock:
            self._pending_aborts.add(request_id)
            self._lock.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = list(self._waiting)
            running = list(self._running)
        return EngineStats(
            num_waiting=len(waiting),
            num_running=len(running),
            kv_used_bytes=self._pool.used_bytes,
            kv_capacity_bytes=self._pool.capacity_bytes,
            kv_num_free_blocks=self._pool.num_free_blocks,
            kv_num_blocks=self._pool.num_blocks,
            num_finished=self._num_finished,
            num_aborted=self._num_aborted,
            batching=str(self._config.batching),
            num_pending_prefill_tokens=sum(len(r.prompt_token_ids) for r in waiting),
            num_remaining_decode_tokens=sum(
                r.sampling.max_tokens - len(r.output_token_ids) for r in waiting + running
            ),
        )

    def _validate(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self._vocab_size})"
            )
        request.sampling.validate()
        total = len(prompt) + request.sampling.max_tokens
        if total > self._max_context_tokens:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"= {total} exceeds the model's context of {self._max_context_tokens} tokens"
            )

    # ---- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    break
                aborts, self._pending_aborts = self._pending_aborts, set()
            self._apply_aborts(aborts)
            try:
                self._step()
            except Exception as exc:  # a failed step must not take the replica down
                logger.exception("engine step failed; failing the running batch")
                self._fail_running(f"engine error: {exc}")
        self._fail_all("engine is shutting down")

    def _step(self) -> None:
        admitted = self._admit()
        previously_running = [r for r in self._running if r not in admitted]
        if admitted:
            self._prefill(admitted)
        if previously_running:
            self._decode(previously_running)
        with self._lock:
            self._running = [r for r in self._running if not r.finished]

    def _admit(self) -> list[EngineRequest]:
        """FCFS admission while batch slots and KV reservations last."""
        if self._config.batching is BatchingMode.STATIC and self._running:
            return []
        admitted: list[EngineRequest] = []
        with self._lock:
            while self._waiting and len(self._running) < self._config.max_batch_size:
                head = self._waiting[0]
                if head.reserved_blocks > self._pool.num_blocks - self._reserved_blocks:
                    break
                self._waiting.popleft()
                self._reserved_blocks += head.reserved_blocks
                self._running.append(head)
                admitted.append(head)
        now_ns = time.time_ns()
        for request in admitted:
            request.admitted_ns = now_ns
            request.kv = SequenceKV(self_blocks=[], cross_blocks=[])
            request.generator = make_generator(request.sampling)
        return admitted

    def _prefill(self, batch: list[EngineRequest]) -> None:
        logits = self._runner.prefill(
            [r.kv for r in batch],
            [r.prompt_token_ids for r in batch],  # type: ignore[misc]
        )
        end_ns = time.time_ns()
        for request in batch:
            request.prefill_end_ns = end_ns
            request.prefill_batch_size = len(batch)
        self._emit_tokens(batch, logits)

    def _decode(self, batch: list[EngineRequest]) -> None:
        logits = self._runner.decode(
            [r.kv for r in batch],
            [r.output_token_ids[-1] for r in batch],  # type: ignore[misc]
        )
        self._emit_tokens(batch, logits)

    def _emit_tokens(self, batch: list[EngineRequest], logits: torch.Tensor) -> None:
        tokens = sample_next_tokens(
            logits, [r.sampling for r in batch], [r.generator for r in batch]
        )
        now_s = time.monotonic()
        for request, token in zip(batch, tokens, strict=True):
            request.output_token_ids.append(token)
            finish = self._finish_reason(request, token)
            timings = self._finish(request) if finish is not None else None
            request.on_event(
                EngineEvent(
                    request.request_id,
                    [token],
                    [now_s - request.arrival_s],
                    finish_reason=finish,
                    timings=timings,
                )
            )

    def _finish_reason(self, request: EngineRequest, token: int) -> FinishReason | None:
        if token == self._eos_token_id and not request.sampling.ignore_eos:
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.sampling.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: EngineRequest) -> RequestTimings:
        """Early termination: the request leaves the batch at once and frees its KV."""
        self._release(request)
        self._num_finished += 1
        return RequestTimings(
            arrival_ns=request.arrival_ns,
            admitted_ns=request.admitted_ns,
            prefill_end_ns=request.prefill_end_ns,
            finished_ns=time.time_ns(),
            prefill_batch_size=request.prefill_batch_size,
        )

    def _release(self, request: EngineRequest) -> None:
        request.finished = True
        if request.kv is not None:
            self._runner.release(request.kv)
            request.kv = None
        with self._lock:
            self._reserved_blocks -= request.reserved_blocks
        request.reserved_blocks = 0

    def _apply_aborts(self, request_ids: set[str]) -> None:
        if not request_ids:
            return
        with self._lock:
            dropped = [r for r in self._waiting if r.request_id in request_ids]
            for request in dropped:
                self._waiting.remove(request)
            running = [r for r in self._running if r.request_id in request_ids]
            self._running = [r for r in self._running if r.request_id not in request_ids]
        for request in running:
            self._release(request)
        self._num_aborted += len(dropped) + len(running)

    def _fail_running(self, message: str) -> None:
        with self._lock:
            failed, self._running = self._running, []
        for request in failed:
            if not request.finished:
                self._release(request)
                request.on_event(EngineEvent(request.request_id, [], [], error=message))

    def _fail_all(self, message: str) -> None:
        self._fail_running(message)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.on_event(EngineEvent(request.request_id, [], [], error=message))
