"""A small stand-in for the OpenAI-compatible gateway, for testing the bench client alone.

It speaks the same wire format (SSE completion chunks with token_ids, a usage chunk, [DONE])
and runs on its own thread's event loop, so tests can drive the client with asyncio.run or
through the CLI. Special max_tokens values trigger the failure modes the client must record.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

MODEL = "fake-model"
MAX_MODEL_LEN = 256
VOCAB_SIZE = 100
TOKENS_PER_CHUNK = 2
HTTP_ERROR_MAX_TOKENS = 13  # answered with HTTP 400
STREAM_ERROR_MAX_TOKENS = 17  # one chunk, then an error event
TRUNCATED_MAX_TOKENS = 19  # one chunk, then the stream ends without [DONE]


class FakeGateway:
    def __init__(self, chunk_delay_s: float = 0.002) -> None:
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> FakeGateway:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": MODEL, "object": "model", "max_model_len": MAX_MODEL_LEN}
        return web.json_response({"object": "list", "data": [{**entry, "vocab_size": VOCAB_SIZE}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        max_tokens = body["max_tokens"]
        if max_tokens == HTTP_ERROR_MAX_TOKENS:
            error = {"message": "bad request", "type": "invalid_request_error", "code": "400"}
            return web.json_response({"error": error}, status=400)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        max_tokens = body["max_tokens"]
        for start in range(0, max_tokens, TOKENS_PER_CHUNK):
            await asyncio.sleep(self.chunk_delay_s)
            token_ids = list(range(start, min(start + TOKENS_PER_CHUNK, max_tokens)))
            done = start + TOKENS_PER_CHUNK >= max_tokens
            choice = {"index": 0, "text": "x" * len(token_ids), "token_ids": token_ids}
            await _event(
                response, {"choices": [{**choice, "finish_reason": "length" if done else None}]}
            )
            if max_tokens == STREAM_ERROR_MAX_TOKENS:
                await _event(
                    response, {"error": {"message": "replica died", "type": "server_error"}}
                )
                break
            if max_tokens == TRUNCATED_MAX_TOKENS:
                await response.write_eof()
                return response
        else:
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": max_tokens}
            await _event(response, {"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    chunk = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": MODEL}
    await response.write(b"data: " + json.dumps({**chunk, **payload}).encode() + b"\n\n")
