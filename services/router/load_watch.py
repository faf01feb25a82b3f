"""The router's view of a replica's load, fed by the replica's Worker.WatchLoad stream.

A push says the replica's queued prefill tokens and expected remaining decode tokens, and how
many of this router's requests its engine accepted so far. Between two pushes the router
counts what it sent itself: each request it routes is an unacknowledged entry (its prompt
and max_tokens) until a push's accepted count covers it, so a burst does not all land on the
replica that looked idle at the last push.

The stream is reopened whenever it ends (the replica restarted or was unreachable); a new
worker id in a push means the counts restarted, and the entries sent to the old process are
dropped. An entry the replica refused (no token ever streamed) is dropped at once, and any
entry left unacknowledged for `MAX_UNACKED_S` expires.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

import grpc

from exegpt.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

MAX_UNACKED_S = 5.0


@dataclass(eq=False)
class SentRequest:
    """A request this router sent to the replica that no push has counted yet."""

    tokens: float
    sent_s: float = field(default_factory=time.monotonic)
    done: bool = False  # finished before a push counted it: it owes no more work


@dataclass
class ReplicaLoad:
    """The last push, plus what this router sent since."""

    pushed_tokens: float = 0.0
    num_pushes: int = 0
    worker_id: str = ""
    num_acked: int = 0  # the accepted count of the last push
    connected: bool = False
    unacked: collections.deque[SentRequest] = field(default_factory=collections.deque)

    @property
    def outstanding_tokens(self) -> float:
        """Prefill + expected decode tokens owed: the last push and what was sent since."""
        self._expire()
        return self.pushed_tokens + sum(e.tokens for e in self.unacked if not e.done)

    def sent(self, tokens: float) -> SentRequest:
        entry = SentRequest(tokens)
        self.unacked.append(entry)
        return entry

    def settled(self, entry: SentRequest, streamed: bool) -> None:
        """The request ended: refused before any token (never accepted) drops its entry,
        else the entry stays for a push to count, owing nothing more."""
        if not streamed:
            if entry in self.unacked:
                self.unacked.remove(entry)
        else:
            entry.done = True

    def pushed(self, update: worker_pb2.LoadUpdate) -> None:
        """Apply one push: its load replaces the last, and it acknowledges as many of the
        oldest unacknowledged requests as the replica accepted since the last push."""
        if update.worker_id != self.worker_id:
            self.worker_id = update.worker_id
            self.unacked.clear()
            self.num_acked = update.num_accepted
        newly = max(0, update.num_accepted - self.num_acked)
        for _ in range(min(newly, len(self.unacked))):
            self.unacked.popleft()
        self.num_acked = max(self.num_acked, update.num_accepted)
        self.pushed_tokens = float(
            update.num_pending_prefill_tokens + update.num_remaining_decode_tokens
        )
        self.num_pushes += 1

    def _expire(self) -> None:
        oldest_s = time.monotonic() - MAX_UNACKED_S
        while self.unacked and self.unacked[0].sent_s < oldest_s:
            self.unacked.popleft()


async def watch_load(
    address: str,
    worker: worker_pb2_grpc.WorkerStub,
    load: ReplicaLoad,
    router_id: str,
    retry_s: float,
) -> None:
    """Apply the replica's pushes to `load` forever, reopening the stream when it ends."""
    while True:
        call = worker.WatchLoad(worker_pb2.WatchLoadRequest(router_id=router_id))
        try:
            async for update in call:
                if not load.connected:
                    logger.info("watching the load of replica %s", address)
                load.connected = True
                load.pushed(update)
        except grpc.aio.AioRpcError as exc:
            if load.connected:
                logger.info("load stream of %s ended: %s", address, exc.code().name)
        finally:
            call.cancel()
            load.connected = False
        await asyncio.sleep(retry_s)
