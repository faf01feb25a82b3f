"""Worker.WatchLoad: the replica pushes its load to the routers that watch it.

A push goes out at once when a router starts watching, then whenever the engine's queue
changed (a request queued, admitted, preempted, finished or aborted), and at least every
`heartbeat_s` while nothing changed (the expected remaining decode tokens shrink as
requests decode). Pushes to one watcher are at least `min_interval_s` apart: changes in
between coalesce into one push of the latest state, so each watcher holds at most one
pending push (an event, never a queue) however slowly it reads.

Each push also says how many requests the engine accepted from the watching router (by the
"exegpt-router-id" metadata of their Generate calls), so the router knows which of the
requests it sent are already in the pushed load.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator

from exegpt.v1 import worker_pb2
from services.worker.engine import Engine

MIN_PUSH_INTERVAL_S = 0.05
MAX_ROUTER_IDS = 1024  # routers whose accepted counts are kept (the oldest is forgotten)


class TooManyWatchersError(Exception):
    """More WatchLoad streams are open than the worker serves."""


class LoadBoard:
    """Fans the engine's load out to its WatchLoad streams."""

    def __init__(
        self,
        engine: Engine,
        min_interval_s: float = MIN_PUSH_INTERVAL_S,
        heartbeat_s: float = 0.5,
        max_watchers: int = 64,
    ) -> None:
        self._engine = engine
        self._min_interval_s = min_interval_s
        self._heartbeat_s = heartbeat_s
        self._max_watchers = max_watchers
        self._watchers: set[asyncio.Event] = set()
        self._accepted: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.worker_id = uuid.uuid4().hex
        engine.load_listeners.append(self._on_change)

    @property
    def num_watchers(self) -> int:
        return len(self._watchers)

    def accepted(self, router_id: str) -> None:
        """Count a request the engine accepted from `router_id` (call on the event loop)."""
        if not router_id:
            return
        self._accepted[router_id] = self._accepted.pop(router_id, 0) + 1
        while len(self._accepted) > MAX_ROUTER_IDS:
            self._accepted.popitem(last=False)

    def update(self, router_id: str) -> worker_pb2.LoadUpdate:
        """The load now, as one push to `router_id`."""
        stats = self._engine.stats()
        return worker_pb2.LoadUpdate(
            num_pending_prefill_tokens=stats.num_pending_prefill_tokens,
            num_remaining_decode_tokens=stats.num_remaining_decode_tokens,
            num_waiting=stats.num_waiting,
            num_running=stats.num_running,
            kv_used_bytes=stats.kv_used_bytes,
            kv_capacity_bytes=stats.kv_capacity_bytes,
            num_preemptions=stats.num_preemptions,
            num_accepted=self._accepted.get(router_id, 0),
            worker_id=self.worker_id,
        )

    async def watch(self, router_id: str) -> AsyncIterator[worker_pb2.LoadUpdate]:
        """The pushes for one watcher, until close(); raises TooManyWatchersError."""
        if self._closed:
            return
        if len(self._watchers) >= self._max_watchers:
            raise TooManyWatchersError(
                f"{len(self._watchers)} load watchers are open (at most {self._max_watchers})"
            )
        changed = asyncio.Event()
        changed.set()  # the first push goes out at once
        self._watchers.add(changed)
        last_push_s = float("-inf")
        try:
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), self._heartbeat_s)
                except TimeoutError:
                    pass  # a heartbeat: nothing changed, but decodes progressed
                wait_s = last_push_s + self._min_interval_s - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if self._closed:
                    return
                changed.clear()
                last_push_s = time.monotonic()
                yield self.update(router_id)
        finally:
            self._watchers.discard(changed)

    def close(self) -> None:
        """End every watch stream (the worker is shutting down); call on the event loop."""
        self._closed = True
        for changed in self._watchers:
            changed.set()
        if self._on_change in self._engine.load_listeners:
            self._engine.load_listeners.remove(self._on_change)

    def _on_change(self) -> None:
        """The engine's queue changed (any thread): wake every watcher on the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._wake_all)
        except RuntimeError:  # the event loop is closed: nobody watches any more
            pass

    def _wake_all(self) -> None:
        for changed in self._watchers:
            changed.set()
