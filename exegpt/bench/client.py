"""The benchmark's HTTP side: ask the gateway about its model, then send planned requests
open-loop (at their arrival times, whatever is still in flight) and time every streamed token.

Times in records are seconds since the run started (one `time.perf_counter` origin), so
records from one run can be compared with each other and with their planned arrival times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from exegpt.bench.workload_plan import PlannedRequest, prompt_token_ids

logger = logging.getLogger(__name__)

# Room for a long SSE line (a chunk with many token ids) before aiohttp calls it too long.
READ_BUFFER_BYTES = 1 << 20
MODELS_TIMEOUT_S = 10.0


class BenchError(Exception):
    """A problem that stops the whole benchmark: unreachable gateway, unusable /v1/models."""


class StreamError(Exception):
    """One request failed: an HTTP error, an error event mid-stream, or a malformed stream."""


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class ClientConfig:
    url: str  # the gateway's base URL, without a trailing slash
    server: ServerInfo
    seed: int
    max_concurrency: int | None = None
    timeout_s: float = 600.0


@dataclass
class RequestRecord:
    index: int
    arrival_s: float  # planned
    input_tokens: int
    expected_output_tokens: int
    send_s: float = math.nan
    first_token_s: float | None = None
    end_s: float = math.nan
    token_times_s: list[float] = field(default_factory=list)  # one per output token
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    queue_s: float | None = None  # the engine's, from usage.exegpt_queue_s (None: not sent)
    generation_s: float | None = None  # the engine's, from usage.exegpt_generation_s
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.send_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.send_s


def normalize_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def make_session(api_key: str | None = None, tls_ca: Path | None = None) -> aiohttp.ClientSession:
    """A session sending `Authorization: Bearer api_key`, checking https servers by `tls_ca`."""
    # No connector-wide cap: open-loop arrivals must not queue inside aiohttp; the client's
    # own --max-concurrency semaphore is the only limit.
    ssl_context = ssl.create_default_context(cafile=tls_ca) if tls_ca is not None else True
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_context)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return aiohttp.ClientSession(
        connector=connector, read_bufsize=READ_BUFFER_BYTES, headers=headers
    )


async def fetch_server_info(
    session: aiohttp.ClientSession, url: str, model: str | None = None
) -> ServerInfo:
    """The served model (the first, or `model`) with its context length and vocabulary size."""
    try:
        async with session.get(
            f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
        ) as response:
            if response.status != 200:
                raise BenchError(f"GET {url}/v1/models answered HTTP {response.status}")
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise BenchError(f"cannot reach the gateway at {url}: {reason}") from None
    except json.JSONDecodeError:
        raise BenchError(f"GET {url}/v1/models did not answer JSON") from None
    entries = body.get("data") if isinstance(body, dict) else None
    if not entries:
        raise BenchError(f"the gateway at {url} serves no models")
    if model is not None:
        entries = [entry for entry in entries if entry.get("id") == model]
        if not entries:
            raise BenchError(f"the gateway at {url} does not serve model {model!r}")
    entry = entries[0]
    missing = [key for key in ("id", "max_model_len", "vocab_size") if key not in entry]
    if missing:
        raise BenchError(f"/v1/models entry lacks {', '.join(missing)}: {entry}")
    return ServerInfo(str(entry["id"]), int(entry["max_model_len"]), int(entry["vocab_size"]))


async def run_benchmark(
    session: aiohttp.ClientSession,
    plan: list[PlannedRequest],
    config: ClientConfig,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send every planned request at its arrival time; records come back in plan order."""
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    ordered = sorted(plan, key=lambda request: request.arrival_s)
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for planned in ordered:
        delay_s = start + planned.arrival_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        coro = _run_one(session, planned, config, start, semaphore, on_done)
        tasks.append(asyncio.create_task(coro))
    records = await asyncio.gather(*tasks)
    return sorted(records, key=lambda record: record.index)


async def _run_one(
    session: aiohttp.ClientSession,
    planned: PlannedRequest,
    config: ClientConfig,
    start: float,
    semaphore: asyncio.Semaphore | None,
    on_done: Callable[[RequestRecord], None] | None,
) -> RequestRecord:
    record = RequestRecord(
        planned.index, planned.arrival_s, planned.input_tokens, planned.output_tokens
    )
    payload = completion_payload(planned, config)
    if semaphore is None:
        await _send(session, payload, config, record, start)
    else:
        async with semaphore:
            await _send(session, payload, config, record, start)
    if on_done is not None:
        on_done(record)
    return record


def completion_payload(planned: PlannedRequest, config: ClientConfig) -> dict[str, Any]:
    prompt = prompt_token_ids(
        planned.index, planned.input_tokens, config.server.vocab_size, config.seed
    )
    return {
        "model": config.server.model,
        "prompt": prompt,
        "max_tokens": planned.output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }


async def _send(
    session: aiohttp.ClientSession,
    payload: dict[str, Any],
    config: ClientConfig,
    record: RequestRecord,
    start: float,
) -> None:
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    record.send_s = time.perf_counter() - start
    try:
        async with session.post(
            f"{config.url}/v1/completions", json=payload, timeout=timeout
        ) as response:
            if response.status >= 400:
                raise StreamError(await _http_error(response))
            await _read_stream(response, record, start)
    except StreamError as exc:
        record.error = str(exc)
    except TimeoutError:
        record.error = f"timed out after {config.timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.end_s = time.perf_counter() - start
    if record.error is not None:
        logger.debug("request %d failed: %s", record.index, record.error)


async def _http_error(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text.strip()[:200] or response.reason or ""
    return f"HTTP {response.status}: {message}"


async def _read_stream(
    response: aiohttp.ClientResponse, record: RequestRecord, start: float
) -> None:
    async for raw_line in response.content:
        data = sse_data(raw_line)
        if data is None:
            continue
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise StreamError(f"malformed event: {data[:200]}") from None
        apply_event(record, event, time.perf_counter() - start)
    raise StreamError("stream ended before [DONE]")


def sse_data(raw_line: bytes) -> str | None:
    """The payload of a server-sent `data:` line; None for blank lines, comments, other fields."""
    line = raw_line.decode("utf-8").rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :]
    return data[1:] if data.startswith(" ") else data


def apply_event(record: RequestRecord, event: Any, now_s: float) -> None:
    """Fold one completion chunk into the record; every token in it arrived at now_s."""
    if not isinstance(event, dict):
        raise StreamError(f"malformed event: {event!r:.200}")
    if "error" in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise StreamError(f"error event: {message}")
    usage = event.get("usage")
    if isinstance(usage, dict):
        record.usage_prompt_tokens = usage.get("prompt_tokens")
        record.usage_completion_tokens = usage.get("completion_tokens")
        record.queue_s = _seconds(usage.get("exegpt_queue_s"))
        record.generation_s = _seconds(usage.get("exegpt_generation_s"))
    for choice in event.get("choices") or []:
        token_ids = choice.get("token_ids")
        # Without token ids (a server ignoring return_token_ids) a chunk with text counts as one.
        num_tokens = len(token_ids) if token_ids is not None else int(bool(choice.get("text")))
        if num_tokens and record.first_token_s is None:
            record.first_token_s = now_s
        record.token_times_s.extend([now_s] * num_tokens)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]


def _seconds(value: Any) -> float | None:
    """A usage extension's seconds; None when the server did not send a number."""
    return float(value) if isinstance(value, int | float) else None
