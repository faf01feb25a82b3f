"""OpenAI-compatible HTTP gateway: /v1/completions (JSON or server-sent events),
/v1/models and /health, in front of the router's core.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pydantic
from aiohttp import web
from opentelemetry import trace

from exegpt.errors import HTTP_STATUS, ErrorCode, RequestError
from exegpt.generation import GenerationRequest
from services.router.openai_schema import (
    CompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    usage_chunk_body,
)
from services.router.router import Router

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.gateway")

ROUTER_KEY = web.AppKey("router", Router)


def make_app(router: Router, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    return app


def _error(status: int, message: str, error_type: str, code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, error_type, code), status=status)


def _request_error(exc: RequestError) -> web.Response:
    code = "model_not_found" if exc.code is ErrorCode.NOT_FOUND else str(exc.code)
    error_type = "invalid_request_error" if HTTP_STATUS[exc.code] < 500 else "server_error"
    return _error(HTTP_STATUS[exc.code], exc.message, error_type, code)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer HTTP errors (404, 405, 413, ...) with OpenAI-style JSON bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason, "invalid_request_error")


async def _read_completion_request(request: web.Request) -> CompletionRequest:
    raw = await request.read()  # raises 413 beyond client_max_size
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(ErrorCode.INVALID_ARGUMENT, "request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(ErrorCode.INVALID_ARGUMENT, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID_ARGUMENT, "request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise RequestError(ErrorCode.INVALID_ARGUMENT, f"invalid request: {problems}") from None


async def completions(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    with tracer.start_as_current_span("gateway.completions", kind=trace.SpanKind.SERVER):
        try:
            body = await _read_completion_request(request)
            generation = body.to_generation(request_id)
        except ValueError as exc:
            return _request_error(RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)))
        except RequestError as exc:
            return _request_error(exc)
        model = body.model or _default_model(router)
        if body.stream:
            return await _stream_completion(request, router, body, generation, model)
        try:
            result = await router.generate(generation)
        except RequestError as exc:
            return _request_error(exc)
        return web.json_response(completion_body(request_id, model, result, body.return_token_ids))


async def _stream_completion(
    request: web.Request,
    router: Router,
    body: CompletionRequest,
    generation: GenerationRequest,
    model: str,
) -> web.StreamResponse:
    stream = router.generate_stream(generation)
    try:
        first = await anext(stream)
    except RequestError as exc:  # nothing sent yet: a plain HTTP error is still possible
        return _request_error(exc)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    last = first
    try:
        await _send_event(
            response, chunk_body(generation.request_id, model, first, body.return_token_ids)
        )
        async for chunk in stream:
            last = chunk
            await _send_event(
                response, chunk_body(generation.request_id, model, chunk, body.return_token_ids)
            )
        if body.stream_options and body.stream_options.include_usage:
            await _send_event(response, usage_chunk_body(generation.request_id, model, last))
    except RequestError as exc:
        error_type = "server_error" if HTTP_STATUS[exc.code] >= 500 else "invalid_request_error"
        await _send_event(response, error_body(exc.message, error_type, str(exc.code)))
    finally:
        await stream.aclose()  # cancels the worker call if the client went away
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _default_model(router: Router) -> str:
    models = router.models()
    return models[0].name if models else ""


async def list_models(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    data = [
        {
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "exegpt",
            "max_model_len": info.max_context_tokens,
            "vocab_size": info.vocab_size,
            "family": info.family,
            "has_tokenizer": info.has_tokenizer,
        }
        for info in router.models()
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    pool = request.app[ROUTER_KEY].pool
    healthy = len(pool.healthy())
    body = {
        "status": "ok" if healthy else "unavailable",
        "healthy_replicas": healthy,
        "replicas": len(pool.replicas),
    }
    return web.json_response(body, status=200 if healthy else 503)
