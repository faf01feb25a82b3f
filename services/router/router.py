"""The router's core: pick a replica by policy, forward the request, stream the answer back.

A request is retried on another replica only while nothing has streamed yet, so a client
never sees tokens twice. Cancellation and deadlines travel down to the worker's call.
"""

from __future__ import annotations

import logging
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
from exegpt.v1 import generate_pb2
from services.router.config import RouterConfig
from services.router.policies import make_policy
from services.router.replicas import Replica, ReplicaPool

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.router")


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self.pool = ReplicaPool(config.replicas, config.max_message_bytes)
        self._policy = make_policy(config.policy)

    async def start(self) -> None:
        await self.pool.check_all()
        self.pool.start(self._config.health_check_interval_s)

    async def close(self) -> None:
        await self.pool.close()

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
        timeout_s = timeout_s or self._config.request_timeout_s
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
                try:
                    async for chunk in self._forward(replica, message, timeout_s):
                        streamed = True
                        yield chunk
                    return
                except RequestError as exc:
                    if streamed or exc.code is not ErrorCode.UNAVAILABLE:
                        raise
                    self.pool.mark_unhealthy(replica)
                    logger.warning("retrying %s elsewhere: %s", request_id, exc.message)

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
        return self._policy.choose(candidates)  # type: ignore[return-value]

    async def _forward(
        self, replica: Replica, message: generate_pb2.GenerateRequest, timeout_s: float
    ) -> AsyncIterator[GenerationChunk]:
        call = replica.worker.Generate(
            message, timeout=timeout_s, metadata=tracing.outgoing_metadata()
        )
        replica.num_in_flight += 1
        try:
            async for chunk in call:
                yield chunk_from_proto(chunk)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            replica.num_in_flight -= 1
            # The consumer left early (client disconnect): cancel so the worker frees its KV.
            call.cancel()

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
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
                result.prompt_tokens = chunk.prompt_tokens
                result.completion_tokens = chunk.completion_tokens
        return result


def _serves(replica: Replica, model: str) -> bool:
    return replica.model_info is not None and replica.model_info.name == model
