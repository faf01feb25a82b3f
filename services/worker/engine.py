"""The engine: one per replica. Its step scheduler plans each step; an executor runs it.

It runs on its own thread so the model loop never blocks the gRPC event loop. Callers
`submit()` a request with a callback that receives `EngineEvent`s (tokens, the finish, or an
error) on the engine thread, and `abort()` it when their client goes away. The loop keeps as
many steps in flight as the executor takes (one in process, one per stage in a pipeline)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from exegpt.compute_threads import use_threads
from exegpt.generation import InvalidRequestError
from exegpt.models.config import ModelConfig
from exegpt.models.kv_cache import BlockAllocator
from exegpt.placement import Placement
from exegpt.schedule import Schedule
from services.worker.config import EngineConfig
from services.worker.engine_clock import EngineClock, StepTotals, busy_fraction
from services.worker.executor import Executor
from services.worker.modes import ScheduleMode
from services.worker.observations import Observations
from services.worker.requests import (
    EngineEvent,
    EngineRequest,
    EngineStoppedError,
    QueueFullError,
    RequestTimings,
)
from services.worker.step_plan import StepKind, StepResult
from services.worker.step_scheduler import Delivery, StepScheduler

__all__ = [
    "Engine",
    "EngineEvent",
    "EngineRequest",
    "EngineStats",
    "EngineStoppedError",
    "QueueFullError",
    "RequestTimings",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the loop looks at aborts and executor health while steps run

# Called whenever the queue's state changed (a request queued, admitted, preempted, finished
# or aborted), on the engine thread or a submitter's; it must be quick and must not raise.
LoadListener = Callable[[], None]

# Called on the engine thread with each step that came back (kind, rows, result), for
# metrics; it must be quick and must not raise. It reads, never drains, what was observed.
StepObserver = Callable[[StepKind, int, StepResult], None]


@dataclass(frozen=True)
class PendingSchedule:
    schedule: Schedule
    placement: Placement | None
    mean_input_tokens: float | None


@dataclass(frozen=True)
class ScheduleSwitch:
    schedule: Schedule
    redeployed: bool
    duration_s: float  # from the step boundary to running the new schedule
    started_s: float  # time.monotonic() when the new schedule began to run


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
    engine_policy: str
    num_preemptions: int
    num_recomputed_tokens: int
    queue_time_s: float  # summed over admitted requests: arrival to first admission
    # Busy wall time split into forwards and host work, by step kind (engine_clock.py).
    step_totals: tuple[StepTotals, ...] = ()
    busy_fraction: float = 0.0  # forward time / busy wall time
    step_totals_by_rows: tuple[StepTotals, ...] = ()  # the same, per power-of-two band of rows
    # Pipelines: decode steps sent with tensors built ahead (hits), and built at submit.
    decode_ahead: tuple[int, int] = (0, 0)
    # Calls in which a request offered could not start, by cause (Admission.head_waits).
    head_waits: tuple[tuple[str, int], ...] = ()


class Engine:
    def __init__(
        self,
        executor: Executor,
        config: EngineConfig,
        *,
        model_config: ModelConfig,
        num_blocks: int,
        bytes_per_block: int,
    ) -> None:
        self._executor = executor
        self._config = config
        self._model_config = model_config
        self._bytes_per_block = bytes_per_block
        self._allocator = BlockAllocator(num_blocks)
        self._scheduler = StepScheduler(config, model_config, self._allocator)
        self._wake = threading.Condition()
        self._stopping = False
        self._pending: PendingSchedule | None = None
        self.switches: list[ScheduleSwitch] = []
        self.step_observers: list[StepObserver] = []
        self.load_listeners: list[LoadListener] = []
        self._num_submitted = 0
        self._queue_state: tuple[int, ...] = ()
        self._submitted: dict[int, tuple[StepKind, int]] = {}  # step id -> kind, rows
        self._clock = EngineClock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._torch_threads: int | None = None

    # ---- called from other threads -------------------------------------------------------

    def start(self, torch_threads: int | None = None) -> None:
        """Run the engine loop on its thread, with `torch_threads` OpenMP threads (None: the
        thread's default). It should be the process's one computing thread
        (exegpt/compute_threads.py)."""
        self._torch_threads = torch_threads
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the current step; requests still queued or running get an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout_s)
        self._executor.close()

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; raises InvalidRequestError (also for an id already queued),
        QueueFullError or EngineStoppedError."""
        self._validate(request)
        needed = self._scheduler.max_blocks_for(request)
        if needed > self._allocator.num_blocks:
            raise InvalidRequestError(
                f"request needs {needed} KV blocks at its longest but the "
                f"cache holds {self._allocator.num_blocks}; shorten the prompt or max_tokens"
            )
        with self._wake:
            if self._stopping:
                raise EngineStoppedError("engine is shutting down")
            if not self._executor.healthy():
                raise EngineStoppedError("the replica's executor is down (a stage is not serving)")
            if self._scheduler.num_waiting() >= self._config.max_queue_size:
                raise QueueFullError(
                    f"request queue is full ({self._config.max_queue_size} waiting); retry later"
                )
            self._scheduler.enqueue(request)
            self._num_submitted += 1
            self._wake.notify_all()
        self._notify_load()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); frees its KV at the next step boundary."""
        self._scheduler.request_abort(request_id)
        with self._wake:
            self._wake.notify_all()

    def apply_schedule(
        self,
        schedule: Schedule,
        placement: Placement | None = None,
        mean_input_tokens: float | None = None,
    ) -> None:
        """Run `schedule` from the next step boundary. Control variables change in place; a
        new placement redeploys: admission pauses, the steps in flight finish, the stages load
        their new layers and every running request is recomputed (prompt + its tokens), so
        none is dropped or duplicated."""
        with self._wake:
            self._pending = PendingSchedule(schedule, placement, mean_input_tokens)
            self._wake.notify_all()

    def drain_observations(self) -> Observations:
        return self._scheduler.drain_observations()

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def placement(self) -> Placement | None:
        return self._executor.placement

    @property
    def mode(self) -> ScheduleMode:
        """The schedule mode batches form by (read-only: for stats and reports)."""
        return self._scheduler.mode

    def healthy(self) -> bool:
        return not self._stopping and self._executor.healthy()

    def stats(self) -> EngineStats:
        snapshot = self._scheduler.snapshot()
        num_blocks = self._allocator.num_blocks
        return EngineStats(
            num_waiting=snapshot.num_waiting,
            num_running=snapshot.num_running,
            kv_used_bytes=(num_blocks - snapshot.num_free_blocks) * self._bytes_per_block,
            kv_capacity_bytes=num_blocks * self._bytes_per_block,
            kv_num_free_blocks=snapshot.num_free_blocks,
            kv_num_blocks=num_blocks,
            num_finished=self._scheduler.num_finished,
            num_aborted=self._scheduler.num_aborted,
            batching=str(self._config.batching),
            num_pending_prefill_tokens=snapshot.num_pending_prefill_tokens,
            num_remaining_decode_tokens=snapshot.num_remaining_decode_tokens,
            engine_policy=str(self._config.policy.name),
            num_preemptions=self._scheduler.num_preemptions,
            num_recomputed_tokens=self._scheduler.num_recomputed_tokens,
            queue_time_s=self._scheduler.queue_time_s,
            step_totals=tuple(totals := self._clock.totals()),
            busy_fraction=busy_fraction(totals),
            step_totals_by_rows=tuple(self._clock.totals_by_rows()),
            decode_ahead=self._executor.ahead_counts,
            head_waits=tuple(sorted(self._scheduler.head_waits.items())),
        )

    def _validate(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        vocab_size = self._model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            )
        request.sampling.validate()
        total = len(prompt) + request.sampling.max_tokens
        limit = self._model_config.max_context_tokens
        if total > limit:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"= {total} exceeds the model's context of {limit} tokens"
            )

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        """The engine thread. Should the loop raise (a defect), its requests get an error and
        the replica reports itself unhealthy and refuses new ones, rather than hang."""
        try:
            use_threads(self._torch_threads)
            self._loop()
        except Exception as exc:
            logger.exception("the engine loop failed; failing its requests")
            with self._wake:
                self._stopping = True
            message = f"replica unavailable: its engine failed ({type(exc).__name__})"
            self._deliver(self._scheduler.fail_all(message, True))
            self._notify_load()

    def _loop(self) -> None:
        scheduler, executor = self._scheduler, self._executor
        while True:
            with self._wake:
                while not (
                    self._stopping
                    or scheduler.has_work()
                    or executor.num_in_flight
                    or self._pending is not None  # an idle replica takes a schedule too
                ):
                    self._clock.stop_busy()
                    self._wake.wait()
                if self._stopping:
                    break
            self._clock.start_busy()
            scheduler.apply_aborts()
            self._check_queue_state()
            if self._pending is not None and not self._apply_pending():
                result = executor.next_result(_POLL_S)  # drain the steps in flight first
                if result is not None:
                    self._apply(result)
                continue
            if not executor.healthy():
                self._deliver(scheduler.fail_all("replica unavailable: a stage is down", True))
                self._submitted.clear()  # their results never come back
                with self._wake:
                    self._wake.wait(_POLL_S)
                continue
            while executor.num_in_flight < executor.max_in_flight:
                plan = scheduler.next_plan()
                if plan is None:
                    break
                self._submitted[plan.step_id] = (plan.kind, len(plan))
                executor.submit(plan)
            self._check_queue_state()  # admissions and preemptions
            if not executor.num_in_flight:
                self._clock.stop_busy()
                with self._wake:  # nothing can run until a request arrives or is aborted
                    self._wake.wait(_POLL_S)
                continue
            result = executor.next_result(_POLL_S)
            if result is not None:
                if result.unavailable:
                    logger.error("executor failed: %s", result.error)
                self._apply(result)
                self._check_queue_state()  # finishes
        self._deliver(scheduler.fail_all("engine is shutting down"))
        self._notify_load()

    def _apply_pending(self) -> bool:
        """Switch to the pending schedule; False while steps must drain before a redeploy."""
        with self._wake:
            pending = self._pending
        assert pending is not None
        placement = pending.placement
        redeploy = placement is not None and placement != self._executor.placement
        if redeploy and self._executor.num_in_flight:
            return False
        start_s = time.perf_counter()
        if redeploy:
            assert placement is not None
            self._scheduler.reset_for_recompute()
            try:
                self._executor.redeploy(placement)
            except ValueError as exc:
                logger.error("cannot deploy the new placement, keeping the old one: %s", exc)
                redeploy = False
        config = replace(
            self._config,
            batching=pending.schedule.kind,
            schedule=pending.schedule,
            mean_input_tokens=pending.mean_input_tokens or self._config.mean_input_tokens,
        )
        self._scheduler.set_mode(config)
        self._config = config
        switch = ScheduleSwitch(
            pending.schedule, redeploy, time.perf_counter() - start_s, time.monotonic()
        )
        self.switches.append(switch)
        logger.info(
            "now running %s%s in %.3f s",
            pending.schedule.describe(),
            " on a new placement" if redeploy else "",
            switch.duration_s,
        )
        with self._wake:
            if self._pending is pending:
                self._pending = None
        return True

    def _check_queue_state(self) -> None:
        """Tell the load listeners when the queue changed since the last look: every queue
        transition moves one of these counters."""
        scheduler = self._scheduler
        state = (
            self._num_submitted,
            scheduler.num_waiting(),
            scheduler.num_finished,
            scheduler.num_aborted,
            scheduler.num_preemptions,
        )
        if state != self._queue_state:
            self._queue_state = state
            self._notify_load()

    def _notify_load(self) -> None:
        for listener in self.load_listeners:
            try:
                listener()
            except Exception:  # a watcher's failure must never stop the engine
                logger.exception("load listener failed")

    def _apply(self, result: StepResult) -> None:
        """Observe a step's result, deliver its tokens, then charge the step its wall time
        (delivery included: it is the step's host work)."""
        submitted = self._submitted.pop(result.step_id, None)
        self._observe(submitted, result)
        self._deliver(self._scheduler.complete(result))
        if submitted is not None:
            kind = "decode" if submitted[0] is StepKind.DECODE else "prefill"
            host_s = self._clock.charge(kind, submitted[1], result.forward_s or result.compute_s)
            # Only a forward measured apart (in process) leaves pure host work: over stages
            # the rest also holds hand-offs, and overlapping steps share their wall time.
            if result.error is None and result.forward_s > 0:
                self._scheduler.observe_host_time(submitted[0], submitted[1], host_s)

    def _observe(self, submitted: tuple[StepKind, int] | None, result: StepResult) -> None:
        if submitted is None or result.error is not None:
            return
        for observer in self.step_observers:
            try:
                observer(submitted[0], submitted[1], result)
            except Exception:  # metrics must never stop the engine
                logger.exception("step observer failed")

    @staticmethod
    def _deliver(deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            try:
                delivery.request.on_event(delivery.event)
            except Exception:  # one caller's broken callback must not stop the engine
                logger.exception("event callback of %s failed", delivery.event.request_id)
