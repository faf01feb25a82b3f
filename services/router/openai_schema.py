"""The OpenAI completions request body, validated, and the response bodies it produces."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from exegpt.generation import GenerationChunk, GenerationRequest, SamplingParams

# Strict: "0.5" is not a number and true is not 1. Integers are range-checked against the
# protobuf fields they end up in, so an overflow is a 400 here rather than a 500 later.
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
UInt32 = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
UInt64 = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]
DEFAULT_MAX_TOKENS = 16


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
    n: UInt32 = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None  # an end-user label: accepted, changes nothing
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False

    def refuse(self) -> None:
        """Raise ValueError naming the first field set to what this server cannot do."""
        unsupported = {
            "n=1": self.n != 1,
            "presence_penalty=0": self.presence_penalty != 0,
            "frequency_penalty=0": self.frequency_penalty != 0,
            "logit_bias={}": bool(self.logit_bias),
        }
        for default, refused in unsupported.items():
            if refused:
                name = default.split("=")[0]
                raise ValueError(f"{name} is not supported by this server (only {default})")

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        self.refuse()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=stop,
        )


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    # Token ids are range-checked with the request (GenerationRequest.validate).
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: UInt32 | None = None
    suffix: StrictStr | None = None
    best_of: UInt32 | None = None

    def refuse(self) -> None:
        super().refuse()
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server (only 1)")
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
            sampling=self.sampling(self.max_tokens),
            prompt_text=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=tuple(prompt) if isinstance(prompt, list) else None,
        )


def completion_body(
    request_id: str, model: str, result: GenerationChunk, return_token_ids: bool
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(result, return_token_ids)],
        "usage": usage_body(result),
    }


def chunk_body(
    request_id: str, model: str, chunk: GenerationChunk, return_token_ids: bool
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(chunk, return_token_ids)],
    }


def usage_chunk_body(request_id: str, model: str, last: GenerationChunk) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_body(last),
    }


def usage_body(chunk: GenerationChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def _choice(chunk: GenerationChunk, return_token_ids: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": chunk.text,
        "logprobs": None,
        "finish_reason": str(chunk.finish_reason) if chunk.finish_reason else None,
    }
    if return_token_ids:
        choice["token_ids"] = chunk.token_ids
    return choice


def error_body(message: str, error_type: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}
