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
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from exegpt.chat import ChatTemplate, ChatTemplateError, render_chat
from exegpt.errors import HTTP_STATUS, ErrorCode, RequestError
from exegpt.generation import GenerationChunk, GenerationRequest
from exegpt.v1 import generate_pb2
from services.router import gateway
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
    top_logprobs: UInt32 | None = None
    # vLLM's extension: end the prompt with the assistant's turn opening (default).
    add_generation_prompt: StrictBool = True

    def refuse(self) -> None:
        super().refuse()
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs / top_logprobs are not supported by this server")

    def to_generation(self, request_id: str, template: ChatTemplate | None) -> GenerationRequest:
        messages = [message.as_dict() for message in self.messages]
        prompt = render_chat(messages, template, self.add_generation_prompt)
        limit = self.max_completion_tokens
        return GenerationRequest(
            request_id=request_id,
            model=self.model or "",
            sampling=self.sampling(self.max_tokens if limit is None else limit),
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
            result = await router.generate(generation)
        except RequestError as exc:
            return gateway._request_error(exc)
        return web.json_response(_completion(request_id, info.name, result))


def _envelope(request_id: str, model: str, kind: str) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}


def _completion(request_id: str, model: str, result: GenerationChunk) -> dict[str, Any]:
    finish = str(result.finish_reason) if result.finish_reason else None
    message = {"role": "assistant", "content": result.text}
    return {
        **_envelope(request_id, model, "chat.completion"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage_body(result),
    }


def _chunk(request_id: str, model: str, delta: dict[str, Any], finish: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**_envelope(request_id, model, "chat.completion.chunk"), "choices": [choice]}


async def _stream(
    request: web.Request,
    router: Router,
    body: ChatCompletionRequest,
    generation: GenerationRequest,
    model: str,
) -> web.StreamResponse:
    request_id = generation.request_id
    stream = router.generate_stream(generation)
    try:
        first = await anext(stream)
    except RequestError as exc:
        return gateway._request_error(exc)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    last = first
    try:
        await gateway._send_event(
            response, _chunk(request_id, model, {"role": "assistant", "content": ""}, None)
        )
        chunk: GenerationChunk | None = first
        while chunk is not None:
            last = chunk
            finish = str(chunk.finish_reason) if chunk.finish_reason else None
            if chunk.text or finish:
                delta = {"content": chunk.text} if chunk.text else {}
                await gateway._send_event(response, _chunk(request_id, model, delta, finish))
            chunk = await anext(stream, None)
        if body.stream_options and body.stream_options.include_usage:
            usage = {**_envelope(request_id, model, "chat.completion.chunk"), "choices": []}
            await gateway._send_event(response, {**usage, "usage": usage_body(last)})
    except RequestError as exc:
        error_type = "server_error" if HTTP_STATUS[exc.code] >= 500 else "invalid_request_error"
        await gateway._send_event(response, error_body(exc.message, error_type, str(exc.code)))
    finally:
        await stream.aclose()  # cancels the worker call if the client went away
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
