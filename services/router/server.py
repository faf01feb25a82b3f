"""The router's gRPC surface: Router.Generate / GenerateStream / ListModels."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aiohttp import web
from opentelemetry import trace

from exegpt import tracing
from exegpt.errors import RequestError
from exegpt.generation import (
    GenerationChunk,
    InvalidRequestError,
    chunk_to_proto,
    finish_reason_to_proto,
    logprobs_to_proto,
    request_from_proto,
)
from exegpt.grpc_errors import to_grpc_status
from exegpt.security import server_ssl_context
from exegpt.serving import GrpcServer, start_grpc_server
from exegpt.v1 import generate_pb2, router_pb2, router_pb2_grpc
from services.router.config import RouterConfig
from services.router.gateway import make_app
from services.router.router import Router

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.router")


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def GenerateStream(  # noqa: N802 (gRPC method name)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateChunk]:
        with tracing.server_span(tracer, "router.GenerateStream", context.invocation_metadata()):
            try:
                generation = request_from_proto(request)
                async for chunk in self._router.generate_stream(
                    generation, context.time_remaining()
                ):
                    yield chunk_to_proto(chunk)
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except RequestError as exc:
                await context.abort(to_grpc_status(exc.code), exc.message)

    async def Generate(  # noqa: N802
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResult:
        with tracing.server_span(tracer, "router.Generate", context.invocation_metadata()):
            try:
                result = await self._router.generate(
                    request_from_proto(request), context.time_remaining()
                )
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except RequestError as exc:
                await context.abort(to_grpc_status(exc.code), exc.message)
            models = self._router.models()
            model = request.model or (models[0].name if models else "")
            return _result_to_proto(result, model)

    async def ListModels(  # noqa: N802
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(models=self._router.models())


def _result_to_proto(result: GenerationChunk, model: str) -> generate_pb2.GenerateResult:
    message = generate_pb2.GenerateResult(
        request_id=result.request_id,
        text=result.text,
        token_ids=result.token_ids,
        token_times_s=result.token_times_s,
        model=model,
        logprobs=logprobs_to_proto(result.logprobs),
    )
    if result.finish_reason is not None:
        message.finish_reason = finish_reason_to_proto(result.finish_reason)
    message.usage.prompt_tokens = result.prompt_tokens
    message.usage.completion_tokens = result.completion_tokens
    message.usage.queue_s = result.queue_s
    message.usage.generation_s = result.generation_s
    return message


@dataclass
class RunningRouter:
    """A started router: its core, gRPC server and HTTP gateway, stopped together."""

    router: Router
    grpc_server: GrpcServer
    http_runner: web.AppRunner
    http_port: int
    http_scheme: str = "http"

    @property
    def grpc_address(self) -> str:
        return self.grpc_server.address

    @property
    def http_url(self) -> str:
        host = self.grpc_server.host
        return f"{self.http_scheme}://{f'[{host}]' if ':' in host else host}:{self.http_port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.grpc_server.stop(grace_s)
        await self.http_runner.cleanup()
        await self.router.close()


async def start_router(config: RouterConfig) -> RunningRouter:
    router = Router(config)
    await router.start()
    servicer = RouterServicer(router)
    grpc_server = await start_grpc_server(
        lambda server: router_pb2_grpc.add_RouterServicer_to_server(servicer, server),
        host=config.host,
        port=config.grpc_port,
        max_message_bytes=config.max_message_bytes,
        security=config.security,
        require_client_cert=False,  # public: clients are authenticated by the API key
    )
    runner = web.AppRunner(
        make_app(
            router, config.max_body_bytes, config.http_body_timeout_s, config.security.api_key
        ),
        handler_cancellation=True,
        access_log=None,
        # aiohttp arms this at connection start too: it doubles as the request-head timeout.
        keepalive_timeout=config.http_idle_timeout_s,
    )
    await runner.setup()
    ssl_context = server_ssl_context(config.security)
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=ssl_context)
    await site.start()
    http_port = runner.addresses[0][1]
    logger.info(
        "router: gRPC on %s, HTTP on %s:%d, replicas %s",
        grpc_server.address,
        config.host,
        http_port,
        ", ".join(config.replicas),
    )
    return RunningRouter(router, grpc_server, runner, http_port, config.security.url_scheme)
