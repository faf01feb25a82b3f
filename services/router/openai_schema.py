"""The OpenAI completions request body, validated, and the response bodies it produces."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from exegpt.generation import GenerationChunk, GenerationRequest, SamplingParams
from services.router.logprobs_json import completion_logprobs

# Strict: "0.5" is not a number and true is not 1. Integers are range-checked against the
# protobuf fields they end up in, so an overflow is a 400 here rather than a 500 later.
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
UInt32 = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
UInt64 = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]
Penalty = Annotated[StrictFloat | StrictInt, Field(ge=-2, le=2, allow_inf_nan=False)]
DEFAULT_MAX_TOKENS = 16
MAX_N = 16  # choices per request (each is its own sequence)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share. An unknown field is refused
    with a 400 naming it, and so is a known one this server cannot honour (`refuse`):
    a client never gets output that silently ignored what it asked for."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: UInt32 | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: UInt64 | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Strings, or token ids (generation ends when one is sampled; vLLM's stop_token_ids too).
    stop: StrictStr | list[StrictStr] | list[UInt32] | None = None
    stop_token_ids: list[UInt32] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None  # an end-user label: accepted, changes nothing
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False

    def refuse(self) -> None:
        """Raise ValueError naming the first field set to what this server cannot do."""
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server (only {})")

    def sampling(self, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        self.refuse()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        stop_ids = [s for s in stops if isinstance(s, int)] + list(self.stop_token_ids or ())
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=tuple(s for s in stops if isinstance(s, str)),
            stop_token_ids=tuple(stop_ids),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            logprobs=logprobs,
        )


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    # Token ids are range-checked with the request (GenerationRequest.validate).
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None  # top alternatives
    suffix: StrictStr | None = None
    best_of: UInt32 | None = None

    def refuse(self) -> None:
        super().refuse()
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server (only equal to n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (no prompt logprobs)")
        if self.echo and not isinstance(self.single_prompt(), str):
            raise ValueError("echo needs the prompt as text, not token ids")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (a batch of prompts is not supported)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]

    def to_generation(self, request_id: str) -> GenerationRequest:
        prompt = self.single_prompt()
        return GenerationRequest(
            request_id=request_id,
            model=self.model or "",
            sampling=self.sampling(self.max_tokens, self.logprobs),
            prompt_text=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=tuple(prompt) if isinstance(prompt, list) else None,
        )


def completion_body(
    request_id: str, model: str, results: list[GenerationChunk], body: CompletionRequest
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice(r, i, body, 0) for i, r in enumerate(results)],
        "usage": usage_body(results),
    }


def chunk_body(
    request_id: str, model: str, chunk: GenerationChunk, index: int, body: CompletionRequest,
    text_offset: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice(chunk, index, body, text_offset)],
    }


def usage_chunk_body(request_id: str, model: str, lasts: list[GenerationChunk]) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_body(lasts),
    }


def usage_body(results: list[GenerationChunk]) -> dict[str, int | float]:
    """The prompt once, the completion tokens of every choice, and (extensions OpenAI
    clients tolerate) `exegpt_queue_s`, the longest seconds a choice waited in the engine's
    queue before its first admission, and `exegpt_generation_s`, the longest seconds from a
    choice's first admission to its last token (its generation latency, exegpt/latency.py)."""
    prompt = max((r.prompt_tokens for r in results), default=0)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "exegpt_queue_s": max((r.queue_s for r in results), default=0.0),
        "exegpt_generation_s": max((r.generation_s for r in results), default=0.0),
    }


def choice(
    chunk: GenerationChunk, index: int, body: CompletionRequest, text_offset: int
) -> dict[str, Any]:
    wanted = body.logprobs is not None
    result: dict[str, Any] = {
        "index": index,
        "text": chunk.text,
        "logprobs": completion_logprobs(chunk.logprobs, text_offset) if wanted else None,
        "finish_reason": str(chunk.finish_reason) if chunk.finish_reason else None,
    }
    if body.return_token_ids:
        result["token_ids"] = chunk.token_ids
    return result


def error_body(message: str, error_type: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}
