"""The router's core: pick a replica by policy, forward the request, stream the answer back.

A request is retried on another replica only while nothing has streamed yet, so a client
never sees tokens twice. Cancellation and deadlines travel down to the worker's call; every
deadline is capped by `request_timeout_s`, a client's too.

Only UNAVAILABLE (a replica that cannot be reached, or that the watchdog found frozen) marks
a replica unhealthy and retries elsewhere. A call the replica's side cancelled is never
passed on as the client's own CANCELLED: unserved, it is RESOURCE_EXHAUSTED (retry later).
Any other error, INTERNAL included, is this request's own and goes back to the client:
retrying it would spread a poison request.

A watchdog cancels the open streams of a replica that made no progress on any of them for
`stall_timeout_s`, or whose health checks fail: streams with no token yet are retried on
another replica, the others end with an explicit UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from exegpt import tracing
from exegpt.errors import ErrorCode, RequestError
from exegpt.generation import (
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    chunk_from_proto,
    request_to_proto,
)
from exegpt.grpc_errors import error_from_rpc
from exegpt.serving import ROUTER_ID_METADATA
from exegpt.v1 import generate_pb2
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.policies import RouterPolicy, make_policy
from services.router.replicas import OpenStream, Replica, ReplicaPool

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.router")


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self.pool = ReplicaPool(
            config.replicas,
            config.max_message_bytes,
            max_reconnect_backoff_s=min(1.0, config.health_check_interval_s),
            security=config.security,
        )
        self._policy = make_policy(config.policy)
        self.router_id = uuid.uuid4().hex  # names this router's requests to the workers
        self.metrics = RouterMetrics(self.pool, str(config.policy))
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pool.check_all()
        watch_as = self.router_id if self._config.policy is RouterPolicy.TOKEN_AWARE else None
        self.pool.start(self._config.health_check_interval_s, watch_load_as=watch_as)
        self._watchdog = asyncio.create_task(self._watch_streams())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        await self.pool.close()

    async def _watch_streams(self) -> None:
        period_s = min(1.0, self._config.stall_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for replica in self.pool.replicas:
                if not replica.streams:
                    continue
                if replica.unreachable:
                    why = "its health checks fail"
                elif now - replica.last_progress_s > self._config.stall_timeout_s:
                    why = f"no progress on its streams for {now - replica.last_progress_s:.0f}s"
                else:
                    continue
                reason = f"replica {replica.address} stopped responding ({why})"
                if num_cancelled := replica.cancel_streams(reason):
                    logger.warning("%s; cancelling its %d streams", reason, num_cancelled)
                self.pool.mark_unhealthy(replica)

    def models(self) -> list[generate_pb2.ModelInfo]:
        return self.pool.models()

    async def generate_stream(
        self, request: GenerationRequest, timeout_s: float | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a generation from a replica; raises RequestError on failure."""
        try:
            request.validate()
        except InvalidRequestError as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        cap_s = self._config.request_timeout_s
        timeout_s = min(timeout_s, cap_s) if timeout_s else cap_s
        deadline_s = time.monotonic() + timeout_s
        request_id = request.request_id or uuid.uuid4().hex
        with tracer.start_as_current_span("router.generate") as span:
            span.set_attribute("exegpt.request_id", request_id)
            message = request_to_proto(request)
            message.request_id = request_id
            tried: set[str] = set()
            while True:
                replica = await self._choose_replica(request.model, tried)
                tried.add(replica.address)
                span.set_attribute("exegpt.replica", replica.address)
                streamed = False
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    raise RequestError(
                        ErrorCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:g}s"
                    )
                sent = replica.note_sent(_expected_tokens(request))
                try:
                    async for chunk in self._forward(replica, message, remaining_s):
                        streamed = True
                        yield chunk
                    return
                except RequestError as exc:
                    if streamed or exc.code is not ErrorCode.UNAVAILABLE:
                        raise
                    self.pool.mark_unhealthy(replica)
                    self.metrics.retried(replica.address)
                    logger.warning("retrying %s elsewhere: %s", request_id, exc.message)
                finally:
                    replica.load.settled(sent, streamed)

    async def _choose_replica(self, model: str, tried: set[str]) -> Replica:
        healthy = await self.pool.wait_for_healthy(self._config.replica_wait_s)
        if model and healthy and not any(_serves(replica, model) for replica in healthy):
            known = ", ".join(info.name for info in self.pool.models())
            raise RequestError(
                ErrorCode.NOT_FOUND, f"model {model!r} does not exist; served models: {known}"
            )
        candidates = [
            replica
            for replica in healthy
            if replica.address not in tried and (not model or _serves(replica, model))
        ]
        if not candidates:
            raise RequestError(ErrorCode.UNAVAILABLE, "no healthy replica can take the request")
        chosen: Replica = self._policy.choose(candidates)  # type: ignore[assignment]
        self.metrics.routed(chosen.address)
        return chosen

    async def _forward(
        self, replica: Replica, message: generate_pb2.GenerateRequest, timeout_s: float
    ) -> AsyncIterator[GenerationChunk]:
        metadata = (*tracing.outgoing_metadata(), (ROUTER_ID_METADATA, self.router_id))
        call = replica.worker.Generate(message, timeout=timeout_s, metadata=metadata)
        stream = replica.open_stream(call)
        finished = streamed = False
        try:
            async for chunk in call:
                streamed = True
                replica.made_progress()
                generated = chunk_from_proto(chunk)
                finished = generated.finish_reason is not None
                yield generated
        except grpc.aio.AioRpcError as exc:
            if stream.stalled is not None:
                raise _stalled(stream) from None
            if exc.code() is grpc.StatusCode.CANCELLED:  # ours raise CancelledError instead
                raise _dropped(replica, streamed) from None
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:  # our key, not the client's
                message = f"replica {replica.address} refused the router's API key"
                raise RequestError(ErrorCode.INTERNAL, message) from None
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError in the reader of a call cancelled by the
            # watchdog; only a cancellation of this task itself must propagate as one.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise _ended_early(replica, stream) from None
        finally:
            replica.close_stream(stream)
            # The consumer left early (client disconnect): cancel so the worker frees its KV.
            call.cancel()
        if not finished:  # a call cut off without a status (e.g. its channel closed)
            raise _ended_early(replica, stream)

    async def generate(
        self, request: GenerationRequest, timeout_s: float | None = None
    ) -> GenerationChunk:
        """The whole generation as one chunk (token ids, text and per-token times joined)."""
        result = GenerationChunk(request_id=request.request_id, token_ids=[])
        async for chunk in self.generate_stream(request, timeout_s):
            result.request_id = chunk.request_id
            result.token_ids += chunk.token_ids
            result.text += chunk.text
            result.token_times_s += chunk.token_times_s
            result.logprobs += chunk.logprobs
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
                result.prompt_tokens = chunk.prompt_tokens
                result.completion_tokens = chunk.completion_tokens
                result.queue_s = chunk.queue_s
                result.generation_s = chunk.generation_s
        return result


def _stalled(stream: OpenStream) -> RequestError:
    return RequestError(ErrorCode.UNAVAILABLE, stream.stalled or "replica stopped responding")


def _ended_early(replica: Replica, stream: OpenStream) -> RequestError:
    """A replica's stream that ended before the generation's last chunk: never a success
    with a cut-off (or empty) output. UNAVAILABLE, so a request with nothing streamed yet
    is tried on another replica."""
    if stream.stalled is not None:
        return _stalled(stream)
    message = f"replica {replica.address} ended the stream before the generation finished"
    logger.warning(message)
    return RequestError(ErrorCode.UNAVAILABLE, message)


def _dropped(replica: Replica, streamed: bool) -> RequestError:
    """A call the replica's side cancelled (the router's own cancels surface as
    CancelledError): never the client's 499. Before any token it is an overloaded replica's
    gRPC backlog dropping the call, a refusal like a full queue (429)."""
    if streamed:
        message = f"replica {replica.address} cancelled the stream before it finished"
        return RequestError(ErrorCode.UNAVAILABLE, message)
    message = f"replica {replica.address} dropped the call unserved (overloaded); retry later"
    return RequestError(ErrorCode.RESOURCE_EXHAUSTED, message)


def _expected_tokens(request: GenerationRequest) -> float:
    """Work a request brings, for token-aware routing until the replica's next push: its
    prompt (text: about 4 characters a token) and max_tokens."""
    if request.prompt_token_ids is not None:
        prompt = len(request.prompt_token_ids)
    else:
        prompt = len(request.prompt_text or "") // 4 + 1
    return prompt + request.sampling.max_tokens


def _serves(replica: Replica, model: str) -> bool:
    return replica.model_info is not None and replica.model_info.name == model
