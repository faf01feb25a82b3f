"""OpenAI-compatible HTTP gateway: /v1/completions (JSON or server-sent events),
/v1/models and /health, in front of the router's core.

Hostile input gets a JSON 4xx, never a 500: bodies must be application/json (a form post
from any web page needs no CORS preflight), nested at most MAX_JSON_DEPTH deep, free of lone
UTF-16 surrogates and read within the body timeout. Anything unexpected is logged with its
stack trace and answered with a JSON 500 carrying an id to find that log line.

With an API key, every path but /health needs `Authorization: Bearer KEY` (401 otherwise,
checked before the body is read). /health stays open for load balancers: it tells only how
many replicas are healthy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pydantic
from aiohttp import web
from opentelemetry import trace

from exegpt.errors import HTTP_STATUS, ErrorCode, RequestError
from exegpt.generation import GenerationChunk, GenerationRequest
from exegpt.metrics import metrics_response
from exegpt.security import key_matches
from services.router.fanout import fan_out, generate_all, stream_all
from services.router.openai_schema import (
    CompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    usage_chunk_body,
)
from services.router.router import Router
from services.router.schedules import replica_schedules

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.gateway")

ROUTER_KEY = web.AppKey("router", Router)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
BEARER_KEY = web.AppKey("bearer", str)
MAX_JSON_DEPTH = 32
OPEN_PATHS = frozenset({"/health"})


def make_app(
    router: Router, max_body_bytes: int, body_timeout_s: float = 30.0, api_key: str | None = None
) -> web.Application:
    middlewares = [_json_errors] if api_key is None else [_json_errors, _authenticate]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[ROUTER_KEY] = router
    app[BODY_TIMEOUT_KEY] = body_timeout_s
    if api_key is not None:
        app[BEARER_KEY] = f"Bearer {api_key}"
    from services.router.chat import chat_completions  # it uses this module's helpers

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/schedule", schedule)
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
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client left: nobody to answer
    except Exception:
        error_id = f"err-{uuid.uuid4().hex}"
        logger.exception("unexpected error %s in %s %s", error_id, request.method, request.path)
        body = error_body(f"internal error (id {error_id})", "server_error", "internal")
        body["error"]["request_id"] = error_id
        return web.json_response(body, status=500)


@web.middleware
async def _authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path in OPEN_PATHS or key_matches(
        request.headers.get("Authorization"), request.app[BEARER_KEY]
    ):
        return await handler(request)
    response = _error(
        401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
        "invalid_api_key",
    )  # fmt: skip
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _invalid(message: str) -> RequestError:
    return RequestError(ErrorCode.INVALID_ARGUMENT, message)


def _check_json(value: Any) -> None:
    """Depth and string checks over a parsed body, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _invalid("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _invalid(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _reject_constant(name: str) -> None:
    raise _invalid(f"{name} is not a JSON number")


async def _read_json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(reason="Content-Type must be application/json")
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT_KEY]):
            raw = await request.read()  # raises 413 beyond client_max_size
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="request body not received in time") from None
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _invalid("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise _invalid(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_json(body)
    return body


async def _read_completion_request(request: web.Request) -> CompletionRequest:
    body = await _read_json_body(request)
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
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
            results = await generate_all(router, fan_out(generation, body.n))
        except RequestError as exc:
            return _request_error(exc)
        if body.echo:
            for result in results:
                result.text = (generation.prompt_text or "") + result.text
        return web.json_response(completion_body(request_id, model, results, body))


async def _stream_completion(
    request: web.Request,
    router: Router,
    body: CompletionRequest,
    generation: GenerationRequest,
    model: str,
) -> web.StreamResponse:
    stream = stream_all(router, fan_out(generation, body.n))
    try:
        first = await anext(stream)
    except RequestError as exc:  # nothing sent yet: a plain HTTP error is still possible
        return _request_error(exc)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    lasts: dict[int, GenerationChunk] = {}
    offsets: dict[int, int] = {}  # text sent so far per choice (logprobs' text_offset)
    try:
        item: tuple[int, GenerationChunk] | None = first
        while item is not None:
            index, chunk = item
            if body.echo and index not in lasts:
                chunk.text = (generation.prompt_text or "") + chunk.text
            lasts[index] = chunk
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(chunk.text)
            payload = chunk_body(generation.request_id, model, chunk, index, body, offset)
            await _send_event(response, payload)
            item = await anext(stream, None)
        if body.stream_options and body.stream_options.include_usage:
            usage = usage_chunk_body(generation.request_id, model, list(lasts.values()))
            await _send_event(response, usage)
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


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: the router's metrics and every replica's (labelled replica=)."""
    return metrics_response(await request.app[ROUTER_KEY].metrics.exposition())


async def health(request: web.Request) -> web.Response:
    pool = request.app[ROUTER_KEY].pool
    healthy = len(pool.healthy())
    body = {
        "status": "ok" if healthy else "unavailable",
        "healthy_replicas": healthy,
        "replicas": len(pool.replicas),
    }
    return web.json_response(body, status=200 if healthy else 503)


async def schedule(request: web.Request) -> web.Response:
    """Each replica's active schedule, its prediction, switches and measured figures; 503
    when no replica answered."""
    replicas = await replica_schedules(request.app[ROUTER_KEY].pool)
    if not any("error" not in replica for replica in replicas):
        body = error_body("no replica answered GetSchedule", "server_error", "unavailable")
        body["replicas"] = replicas
        return web.json_response(body, status=503)
    return web.json_response({"object": "schedule.list", "data": replicas})
