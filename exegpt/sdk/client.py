"""Client SDK over the router's gRPC API: `Client` (blocking) and `AsyncClient` (asyncio).

from exegpt.sdk import Client
with Client("127.0.0.1:50051") as client:
    completion = client.generate("Hello", max_tokens=16)
    for chunk in client.stream([3, 4, 5], max_tokens=8, ignore_eos=True):
        print(chunk.token_ids)

`api_key` (default: $EXEGPT_API_KEY) is sent as `authorization: Bearer KEY`; `tls_ca` makes
the channel TLS, checking the router against that CA (PEM path), and `tls_client_cert` /
`tls_client_key` present a client certificate.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from exegpt import tracing
from exegpt.generation import (
    GenerationRequest,
    SamplingParams,
    finish_reason_from_proto,
    request_to_proto,
)
from exegpt.grpc_errors import error_from_rpc
from exegpt.sdk.types import Completion, CompletionChunk, ExegptError
from exegpt.security import API_KEY_ENV, SecurityConfig, aio_channel, sync_channel
from exegpt.serving import channel_options
from exegpt.v1 import generate_pb2, router_pb2, router_pb2_grpc

_MAX_MESSAGE_BYTES = 16 * 2**20


def _build_request(prompt: str | list[int], model: str, **sampling: Any) -> Any:
    generation = GenerationRequest(
        request_id="",
        model=model,
        sampling=SamplingParams(**sampling),
        prompt_text=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=None if isinstance(prompt, str) else tuple(prompt),
    )
    return request_to_proto(generation)


def _security(
    api_key: str | None,
    tls_ca: str | Path | None,
    tls_client_cert: str | Path | None,
    tls_client_key: str | Path | None,
) -> SecurityConfig:
    def path(value: str | Path | None) -> Path | None:
        return Path(value) if value is not None else None

    return SecurityConfig(
        api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
        tls_ca=path(tls_ca),
        tls_client_cert=path(tls_client_cert),
        tls_client_key=path(tls_client_key),
    )


def _sdk_error(error: grpc.RpcError) -> ExegptError:
    failure = error_from_rpc(error)
    return ExegptError(failure.code, failure.message)


def _completion_from_result(result: generate_pb2.GenerateResult, start_s: float) -> Completion:
    reason = finish_reason_from_proto(result.finish_reason)
    times = list(result.token_times_s)
    return Completion(
        text=result.text,
        token_ids=list(result.token_ids),
        finish_reason=str(reason) if reason else "",
        prompt_tokens=result.usage.prompt_tokens,
        completion_tokens=result.usage.completion_tokens,
        ttft_s=times[0] if times else time.perf_counter() - start_s,
        token_times_s=times,
        request_id=result.request_id,
        queue_s=result.usage.queue_s,
        generation_s=result.usage.generation_s,
    )


def _chunk_from_message(message: generate_pb2.GenerateChunk, start_s: float) -> CompletionChunk:
    reason = finish_reason_from_proto(message.finish_reason)
    return CompletionChunk(
        text=message.text,
        token_ids=list(message.token_ids),
        arrival_s=time.perf_counter() - start_s,
        finish_reason=str(reason) if reason else None,
        prompt_tokens=message.usage.prompt_tokens,
        completion_tokens=message.usage.completion_tokens,
        queue_s=message.usage.queue_s,
        generation_s=message.usage.generation_s,
    )


class Client:
    """Blocking client. `target` is the router's gRPC address, e.g. "127.0.0.1:50051"."""

    def __init__(
        self,
        target: str,
        *,
        model: str = "",
        timeout_s: float | None = 600.0,
        api_key: str | None = None,
        tls_ca: str | Path | None = None,
        tls_client_cert: str | Path | None = None,
        tls_client_key: str | Path | None = None,
    ) -> None:
        security = _security(api_key, tls_ca, tls_client_cert, tls_client_key)
        self._channel = sync_channel(target, security, channel_options(_MAX_MESSAGE_BYTES))
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._model = model
        self._timeout_s = timeout_s

    def generate(self, prompt: str | list[int], **sampling: Any) -> Completion:
        """Generate a whole answer. Sampling options: max_tokens, temperature, top_p, seed,
        ignore_eos (see exegpt.generation.SamplingParams)."""
        request = _build_request(prompt, self._model, **sampling)
        start_s = time.perf_counter()
        try:
            result = self._stub.Generate(
                request, timeout=self._timeout_s, metadata=tracing.outgoing_metadata()
            )
        except grpc.RpcError as exc:
            raise _sdk_error(exc) from None
        return _completion_from_result(result, start_s)

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[CompletionChunk]:
        """Yield chunks of tokens as they are generated; closing the iterator cancels."""
        request = _build_request(prompt, self._model, **sampling)
        start_s = time.perf_counter()
        call = self._stub.GenerateStream(
            request, timeout=self._timeout_s, metadata=tracing.outgoing_metadata()
        )
        try:
            for message in call:
                yield _chunk_from_message(message, start_s)
        except grpc.RpcError as exc:
            raise _sdk_error(exc) from None
        finally:
            call.cancel()

    def list_models(self) -> list[str]:
        response = self._stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        return [model.name for model in response.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as Client, awaited."""

    def __init__(
        self,
        target: str,
        *,
        model: str = "",
        timeout_s: float | None = 600.0,
        api_key: str | None = None,
        tls_ca: str | Path | None = None,
        tls_client_cert: str | Path | None = None,
        tls_client_key: str | Path | None = None,
    ) -> None:
        security = _security(api_key, tls_ca, tls_client_cert, tls_client_key)
        self._channel = aio_channel(target, security, channel_options(_MAX_MESSAGE_BYTES))
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._model = model
        self._timeout_s = timeout_s

    async def generate(self, prompt: str | list[int], **sampling: Any) -> Completion:
        request = _build_request(prompt, self._model, **sampling)
        start_s = time.perf_counter()
        try:
            result = await self._stub.Generate(
                request, timeout=self._timeout_s, metadata=tracing.outgoing_metadata()
            )
        except grpc.RpcError as exc:
            raise _sdk_error(exc) from None
        return _completion_from_result(result, start_s)

    async def stream(
        self, prompt: str | list[int], **sampling: Any
    ) -> AsyncIterator[CompletionChunk]:
        request = _build_request(prompt, self._model, **sampling)
        start_s = time.perf_counter()
        call = self._stub.GenerateStream(
            request, timeout=self._timeout_s, metadata=tracing.outgoing_metadata()
        )
        try:
            async for message in call:
                yield _chunk_from_message(message, start_s)
        except grpc.RpcError as exc:
            raise _sdk_error(exc) from None
        finally:
            call.cancel()

    async def list_models(self) -> list[str]:
        response = await self._stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        return [model.name for model in response.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
