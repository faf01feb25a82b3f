"""POST /v1/chat/completions: messages become a prompt with the model's chat template
(exegpt/chat.py; a documented fallback when the checkpoint has none), then generate as
/v1/completions does, answered as a chat.completion or a stream of chat.completion.chunk."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import pydantic
from aiohttp import web
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from exegpt.chat import ChatTemplate, ChatTemplateError, render_chat
from exegpt.errors import HTTP_STATUS, ErrorCode, RequestError
from exegpt.generation import MAX_LOGPROBS, GenerationChunk, GenerationRequest
from exegpt.v1 import generate_pb2
from services.router import gateway
from services.router.fanout import fan_out, generate_all, stream_all
from services.router.logprobs_json import chat_logprobs
from services.router.openai_schema import SamplingFields, UInt32, error_body, usage_body
from services.router.router import Router

tracer = trace.get_tracer("exegpt.gateway")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: UInt32 | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # vLLM's extension: end the prompt with the assistant's turn opening (default).
    add_generation_prompt: StrictBool = True

    def refuse(self) -> None:
        super().refuse()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")

    def to_generation(self, request_id: str, template: ChatTemplate | None) -> GenerationRequest:
        messages = [message.as_dict() for message in self.messages]
        prompt = render_chat(messages, template, self.add_generation_prompt)
        limit = self.max_completion_tokens
        return GenerationRequest(
            request_id=request_id,
            model=self.model or "",
            sampling=self.sampling(
                self.max_tokens if limit is None else limit,
                (self.top_logprobs or 0) if self.logprobs else None,
            ),
            prompt_text=prompt,
        )


def _model_info(router: Router, name: str | None) -> generate_pb2.ModelInfo:
    models = router.models()
    if not models:
        raise RequestError(ErrorCode.UNAVAILABLE, "no healthy replica can take the request")
    for info in models:
        if not name or info.name == name:
            if not info.has_tokenizer:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"model {info.name!r} has no tokenizer: chat needs one",
                )
            return info
    known = ", ".join(info.name for info in models)
    raise RequestError(ErrorCode.NOT_FOUND, f"model {name!r} does not exist; served: {known}")


def _template(info: generate_pb2.ModelInfo) -> ChatTemplate | None:
    if not info.chat_template:
        return None
    return ChatTemplate(info.chat_template, info.bos_token, info.eos_token)


async def _read(request: web.Request) -> ChatCompletionRequest:
    body = await gateway._read_json_body(request)
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID_ARGUMENT, "request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise RequestError(ErrorCode.INVALID_ARGUMENT, f"invalid request: {problems}") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    router = request.app[gateway.ROUTER_KEY]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    with tracer.start_as_current_span("gateway.chat_completions", kind=trace.SpanKind.SERVER):
        try:
            body = await _read(request)
            info = _model_info(router, body.model)
            generation = body.to_generation(request_id, _template(info))
        except (ValueError, ChatTemplateError) as exc:
            return gateway._request_error(RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)))
        except RequestError as exc:
            return gateway._request_error(exc)
        if body.stream:
            return await _stream(request, router, body, generation, info.name)
        try:
            results = await generate_all(router, fan_out(generation, body.n))
        except RequestError as exc:
            return gateway._request_error(exc)
        return web.json_response(_completion(request_id, info.name, results, body.logprobs))


def _envelope(request_id: str, model: str, kind: str) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}


def _completion(
    request_id: str, model: str, results: list[GenerationChunk], logprobs: bool
) -> dict[str, Any]:
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": chat_logprobs(result.logprobs) if logprobs else None,
            "finish_reason": str(result.finish_reason) if result.finish_reason else None,
        }
        for index, result in enumerate(results)
    ]
    return {
        **_envelope(request_id, model, "chat.completion"),
        "choices": choices,
        "usage": usage_body(results),
    }


def _chunk(
    request_id: str, model: str, delta: dict[str, Any], finish: Any, index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {**_envelope(request_id, model, "chat.completion.chunk"), "choices": [choice]}


async def _stream(
    request: web.Request,
    router: Router,
    body: ChatCompletionRequest,
    generation: GenerationRequest,
    model: str,
) -> web.StreamResponse:
    request_id = generation.request_id
    stream = stream_all(router, fan_out(generation, body.n))
    try:
        first = await anext(stream)
    except RequestError as exc:
        return gateway._request_error(exc)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    lasts: dict[int, GenerationChunk] = {}
    try:
        for index in range(body.n):
            role = {"role": "assistant", "content": ""}
            await gateway._send_event(response, _chunk(request_id, model, role, None, index))
        item: tuple[int, GenerationChunk] | None = first
        while item is not None:
            index, chunk = lasts_put(lasts, item)
            finish = str(chunk.finish_reason) if chunk.finish_reason else None
            if chunk.text or finish or chunk.logprobs:
                delta = {"content": chunk.text} if chunk.text else {}
                logprobs = chat_logprobs(chunk.logprobs) if body.logprobs else None
                payload = _chunk(request_id, model, delta, finish, index, logprobs)
                await gateway._send_event(response, payload)
            item = await anext(stream, None)
        if body.stream_options and body.stream_options.include_usage:
            usage = {**_envelope(request_id, model, "chat.completion.chunk"), "choices": []}
            await gateway._send_event(response, {**usage, "usage": usage_body([*lasts.values()])})
    except RequestError as exc:
        error_type = "server_error" if HTTP_STATUS[exc.code] >= 500 else "invalid_request_error"
        await gateway._send_event(response, error_body(exc.message, error_type, str(exc.code)))
    finally:
        await stream.aclose()  # cancels the worker call if the client went away
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def lasts_put(
    lasts: dict[int, GenerationChunk], item: tuple[int, GenerationChunk]
) -> tuple[int, GenerationChunk]:
    """Record `item` as its choice's latest chunk (for usage) and return it."""
    lasts[item[0]] = item[1]
    return item
