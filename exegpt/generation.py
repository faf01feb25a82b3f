"""The generation contract as plain dataclasses, and their conversion to and from protobuf.

Handlers convert proto messages here at the boundary; engines, the SDK and the gateway work
with these types. Validation that needs no model lives here too, so every entry point
rejects the same bad input with the same message.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from exegpt.v1 import generate_pb2


class InvalidRequestError(ValueError):
    """The request can never be served as given (maps to INVALID_ARGUMENT / HTTP 400)."""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model produced EOS, or the text reached a stop string
    LENGTH = "length"  # max_tokens was reached


_FINISH_TO_PROTO = {
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 5 on completions, 20 on chat)
MAX_PENALTY = 2.0


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str = ""  # the token's text alone (filled by the worker, which has the tokenizer)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob under the distribution it was drawn from (after
    penalties and temperature; greedy rows at temperature 1, so without penalties it is the
    model's own log-softmax), and the top alternatives there, most likely first."""

    token_id: int
    logprob: float
    token: str = ""
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 selects greedy decoding
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # the output ends before the first of these in its text
    stop_token_ids: tuple[int, ...] = ()  # generation ends when one of these is sampled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top alternatives per token; None: no logprobs at all

    def validate(self) -> None:
        self._validate_extras()
        if len(self.stop) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError(
                f"stop takes at most {MAX_STOPS} non-empty strings of up to {MAX_STOP_CHARS} "
                "characters"
            )
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}")

    def _validate_extras(self) -> None:
        if len(self.stop_token_ids) > MAX_STOPS or any(
            not 0 <= t < 2**32 for t in self.stop_token_ids
        ):
            raise InvalidRequestError(f"stop takes at most {MAX_STOPS} token ids")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}]")


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt given either as text or as token ids (exactly one of them)."""

    request_id: str
    sampling: SamplingParams
    prompt_text: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    model: str = ""

    def validate(self) -> None:
        if (self.prompt_text is None) == (self.prompt_token_ids is None):
            raise InvalidRequestError("give the prompt either as text or as token ids")
        if self.prompt_text is not None and not self.prompt_text:
            raise InvalidRequestError("prompt is empty")
        if self.prompt_token_ids is not None:
            if not self.prompt_token_ids:
                raise InvalidRequestError("prompt is empty")
            # The model checks the upper bound against its vocabulary; the wire type is uint32.
            bad = [t for t in self.prompt_token_ids if not 0 <= t < 2**32]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary")
        self.sampling.validate()


@dataclass
class GenerationChunk:
    """Tokens produced since the previous chunk; the last chunk carries finish_reason."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    token_times_s: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked
    # With the finish: seconds from the engine receiving the request to its first admission.
    queue_s: float = 0.0
    # With the finish: seconds from its first admission to its last token (exegpt/latency.py).
    generation_s: float = 0.0


def sampling_from_proto(msg: generate_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        ignore_eos=msg.ignore_eos,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def sampling_to_proto(params: SamplingParams) -> generate_pb2.SamplingParams:
    msg = generate_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        ignore_eos=params.ignore_eos,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def request_from_proto(msg: generate_pb2.GenerateRequest) -> GenerationRequest:
    prompt = msg.WhichOneof("prompt")
    if not msg.HasField("sampling"):
        raise InvalidRequestError("sampling.max_tokens is required")
    return GenerationRequest(
        request_id=msg.request_id,
        model=msg.model,
        sampling=sampling_from_proto(msg.sampling),
        prompt_text=msg.text if prompt == "text" else None,
        prompt_token_ids=tuple(msg.token_ids.ids) if prompt == "token_ids" else None,
    )


def request_to_proto(request: GenerationRequest) -> generate_pb2.GenerateRequest:
    msg = generate_pb2.GenerateRequest(
        request_id=request.request_id,
        model=request.model,
        sampling=sampling_to_proto(request.sampling),
    )
    if request.prompt_text is not None:
        msg.text = request.prompt_text
    if request.prompt_token_ids is not None:
        msg.token_ids.ids.extend(request.prompt_token_ids)
    return msg


def chunk_to_proto(chunk: GenerationChunk) -> generate_pb2.GenerateChunk:
    msg = generate_pb2.GenerateChunk(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        token_times_s=chunk.token_times_s,
        logprobs=logprobs_to_proto(chunk.logprobs),
    )
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH_TO_PROTO[chunk.finish_reason]
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
        msg.usage.queue_s = chunk.queue_s
        msg.usage.generation_s = chunk.generation_s
    return msg


def chunk_from_proto(msg: generate_pb2.GenerateChunk) -> GenerationChunk:
    finish = _FINISH_FROM_PROTO.get(msg.finish_reason)
    return GenerationChunk(
        request_id=msg.request_id,
        token_ids=list(msg.token_ids),
        text=msg.text,
        token_times_s=list(msg.token_times_s),
        finish_reason=finish,
        prompt_tokens=msg.usage.prompt_tokens,
        completion_tokens=msg.usage.completion_tokens,
        logprobs=logprobs_from_proto(msg.logprobs),
        queue_s=msg.usage.queue_s,
        generation_s=msg.usage.generation_s,
    )


def logprobs_to_proto(logprobs: list[TokenLogprob]) -> list[generate_pb2.TokenLogprob]:
    return [
        generate_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            token=lp.token,
            top=[generate_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token)
                 for t in lp.top],
        )
        for lp in logprobs
    ]  # fmt: skip


def logprobs_from_proto(messages: Iterable[generate_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            m.token_id, m.logprob, m.token,
            tuple(TopLogprob(t.token_id, t.logprob, t.token) for t in m.top),
        )
        for m in messages
    ]  # fmt: skip


def finish_reason_to_proto(reason: FinishReason) -> int:
    return _FINISH_TO_PROTO[reason]


def finish_reason_from_proto(value: int) -> FinishReason | None:
    return _FINISH_FROM_PROTO.get(value)
