"""The profiler service's core: checked requests, one run per device, a profile store.

No grpc here (server.py translates). A run goes: check the request (before anything
waits or loads), take a place in the device's queue (or RESOURCE_EXHAUSTED when it is
full), load and measure on a worker thread while progress flows back to the event loop,
then store the profile. Timings taken while another run uses the same device are wrong,
so a device is handed to one run at a time, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from exegpt.errors import ErrorCode, RequestError
from exegpt.models.defaults import DEFAULT_MODEL_NAME
from exegpt.profile.format import ProfileData, ProfileError
from services.profiler.config import ProfilerConfig
from services.profiler.measure.grid import AXES, ProfileGrid
from services.profiler.measure.run import (
    CheckedRequest,
    ProfileRequest,
    ProfilingCancelled,
    ProgressEvent,
    check_request,
    measure,
    prepare_run,
)
from services.profiler.store import ProfileStore, ProfileSummary

logger = logging.getLogger(__name__)

Runner = Callable[[CheckedRequest, Callable[[ProgressEvent], None]], ProfileData]


def default_runner(
    checked: CheckedRequest, on_progress: Callable[[ProgressEvent], None]
) -> ProfileData:
    """Load the model and measure it (on a worker thread)."""
    return measure(prepare_run(checked.request), on_progress)


@dataclass(frozen=True)
class Queued:
    position: int  # runs ahead on the device, the running one included
    device: str


@dataclass(frozen=True)
class Done:
    summary: ProfileSummary


Event = Queued | ProgressEvent | Done


@dataclass(eq=False)
class _Ticket:
    devices: frozenset[str]
    running: bool = False


@dataclass
class DeviceQueue:
    """Arrival-ordered tickets; a ticket runs when no earlier one shares a device with it."""

    max_waiting: int
    _tickets: list[_Ticket] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, devices: frozenset[str]) -> _Ticket:
        ahead = [t for t in self._tickets if t.devices & devices]
        num_waiting = sum(not t.running for t in ahead)
        if ahead and num_waiting >= self.max_waiting:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{', '.join(sorted(devices))} is busy profiling and {num_waiting} more "
                f"run(s) wait for it (at most {self.max_waiting} may); try again later",
            )
        ticket = _Ticket(devices)
        self._tickets.append(ticket)
        return ticket

    def position(self, ticket: _Ticket) -> int:
        index = self._tickets.index(ticket)
        return sum(1 for t in self._tickets[:index] if t.devices & ticket.devices)

    async def changed(self) -> None:
        await self._changed.wait()

    def leave(self, ticket: _Ticket) -> None:
        if ticket in self._tickets:
            self._tickets.remove(ticket)
        self._changed.set()  # wake every waiter, then arm a fresh event
        self._changed = asyncio.Event()

    @property
    def num_running(self) -> int:
        return sum(t.running for t in self._tickets)


class ProfilerCore:
    def __init__(self, config: ProfilerConfig, runner: Runner = default_runner) -> None:
        self.config = config
        self.store = ProfileStore(config.profile_dir)
        self._runner = runner
        self._queue = DeviceQueue(config.max_queued_per_device)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="profile")
        self._cancels: set[threading.Event] = set()
        self._runs: set[asyncio.Future[ProfileData]] = set()
        self._closed = False

    # ---- StartProfile ----------------------------------------------------------------------

    async def check(self, request: ProfileRequest) -> CheckedRequest:
        """INVALID_ARGUMENT for bad input, before the request waits for anything."""
        self._check_model(request.model)
        if request.grid is not None:
            self._check_limits(request.grid)
        try:
            return await asyncio.to_thread(check_request, request)
        except ValueError as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def _check_model(self, model: str) -> None:
        """Only the embedded model and checkpoints under the configured model roots: a
        request must not make the service read arbitrary paths on its host."""
        if model == DEFAULT_MODEL_NAME:
            return
        path = Path(model).resolve()
        roots = [Path(root).resolve() for root in self.config.model_roots]
        if not any(path == root or root in path.parents for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "none configured"
            raise _invalid(
                f"unknown model {model!r}: this service loads {DEFAULT_MODEL_NAME!r} and "
                f"checkpoint directories under its model roots ({allowed}; see --model-root)"
            )

    def _check_limits(self, grid: ProfileGrid) -> None:
        config = self.config
        for axis in AXES:
            values = getattr(grid, axis)
            limit = config.max_size_tokens
            if axis == "message_bytes":
                limit = config.max_message_size_bytes
            if len(values) > config.max_points_per_axis:
                raise _invalid(
                    f"grid {axis} has {len(values)} sizes; at most {config.max_points_per_axis}"
                )
            if values and max(values) > limit:
                raise _invalid(f"grid {axis} goes up to {max(values)}; this service allows {limit}")
        repeats = grid.num_repeats * grid.num_rounds
        if repeats > config.max_num_repeats or grid.num_warmup > config.max_num_warmup:
            raise _invalid(
                f"grid asks for {grid.num_warmup} warm-up runs and {repeats} repeats (over all "
                f"rounds); this service allows {config.max_num_warmup} and "
                f"{config.max_num_repeats}"
            )

    async def profile(self, request: ProfileRequest) -> AsyncIterator[Event]:
        """Check, wait for the device, measure, store: events as they happen."""
        if self._closed:
            raise RequestError(ErrorCode.UNAVAILABLE, "the profiler is shutting down")
        checked = await self.check(request)
        ticket = self._queue.enter(checked.devices_used())
        handed_over = False
        try:
            while (position := self._queue.position(ticket)) > 0:
                yield Queued(position, ",".join(sorted(ticket.devices)))
                await self._queue.changed()
            ticket.running = True
            cancel = threading.Event()
            events: asyncio.Queue[ProgressEvent] = asyncio.Queue()
            run = self._start(checked, cancel, events)
            run.add_done_callback(lambda _: self._queue.leave(ticket))
            handed_over = True  # the device stays held until the thread has stopped
            try:
                async for event in _progress_until(run, events):
                    yield event
                data = run.result()
            except ProfilingCancelled:
                raise RequestError(ErrorCode.CANCELLED, "the profiling run was cancelled") from None
            except ValueError as exc:  # found only once the weights were loaded
                raise _invalid(str(exc)) from None
            except RuntimeError as exc:
                raise RequestError(ErrorCode.INTERNAL, str(exc)) from None
            finally:
                cancel.set()  # a client that went away stops the run at the next measurement
            try:
                summary = await asyncio.to_thread(self.store.save, data)
            except (OSError, ProfileError) as exc:
                raise RequestError(ErrorCode.INTERNAL, f"cannot store the profile: {exc}") from None
            logger.info("stored profile %s (%.1f s)", summary.profile_id, data.profiling_time_s)
            yield Done(summary)
        finally:
            if not handed_over:
                self._queue.leave(ticket)

    def _start(
        self,
        checked: CheckedRequest,
        cancel: threading.Event,
        events: asyncio.Queue[ProgressEvent],
    ) -> asyncio.Future[ProfileData]:
        loop = asyncio.get_running_loop()

        def on_progress(event: ProgressEvent) -> None:
            if cancel.is_set():
                raise ProfilingCancelled()
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> ProfileData:
            try:
                return self._runner(checked, on_progress)
            except (ValueError, ProfilingCancelled):
                raise
            except Exception as exc:  # surfaced as INTERNAL with the reason
                logger.exception("profiling run failed")
                raise RuntimeError(f"profiling failed: {exc}") from exc

        self._cancels.add(cancel)
        run = loop.run_in_executor(self._executor, work)
        self._runs.add(run)
        run.add_done_callback(lambda _: (self._runs.discard(run), self._cancels.discard(cancel)))
        return run

    # ---- GetProfile / ListProfiles ---------------------------------------------------------

    async def get(self, profile_id: str) -> tuple[ProfileSummary, str]:
        summary, text = await asyncio.to_thread(self.store.read, profile_id)
        room = self.config.max_message_bytes - 4096  # the summary and framing
        if summary.size_bytes > room:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"profile {profile_id} is {summary.size_bytes} bytes, more than this service's "
                f"{self.config.max_message_bytes}-byte messages carry",
            )
        return summary, text

    async def list(
        self, model: str = "", device: str = "", limit: int = 0
    ) -> tuple[list[ProfileSummary], int]:
        summaries, num_invalid = await asyncio.to_thread(self.store.list)
        chosen = [
            s
            for s in summaries
            if (not model or s.model_name == model) and (not device or s.device == device)
        ]
        limit = min(limit, self.config.max_list) if limit > 0 else self.config.max_list
        return chosen[:limit], num_invalid

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self._queue.num_running

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop the running measurements (between two of them) and wait for their threads."""
        self._closed = True
        for cancel in list(self._cancels):
            cancel.set()
        if self._runs:
            await asyncio.wait(list(self._runs), timeout=timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _progress_until(
    run: asyncio.Future[ProfileData], events: asyncio.Queue[ProgressEvent]
) -> AsyncIterator[ProgressEvent]:
    """Progress events until the run finishes (its result or error is then in `run`)."""
    while True:
        getter = asyncio.ensure_future(events.get())
        try:
            done, _ = await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():  # the run ended, or the caller went away
                getter.cancel()
        if getter in done:
            yield getter.result()
            continue
        while not events.empty():
            yield events.get_nowait()
        return


def _invalid(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_ARGUMENT, message)
