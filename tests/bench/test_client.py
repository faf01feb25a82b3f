"""The streaming client against a fake gateway: timing, token counts, pacing, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from exegpt.bench.client import (
    BenchError,
    ClientConfig,
    RequestRecord,
    ServerInfo,
    apply_event,
    fetch_server_info,
    make_session,
    run_benchmark,
    sse_data,
)
from exegpt.bench.workload_plan import PlannedRequest
from tests.bench import fake_gateway
from tests.bench.fake_gateway import FakeGateway


@pytest.fixture(scope="module")
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway().start()
    yield server
    server.stop()


def _run(
    gateway: FakeGateway, plan: list[PlannedRequest], max_concurrency: int | None = None
) -> list[RequestRecord]:
    async def go() -> list[RequestRecord]:
        async with make_session() as session:
            server = await fetch_server_info(session, gateway.url)
            config = ClientConfig(gateway.url, server, seed=0, max_concurrency=max_concurrency)
            return await run_benchmark(session, plan, config)

    return asyncio.run(go())


def _info(url: str, model: str | None = None) -> ServerInfo:
    async def go() -> ServerInfo:
        async with make_session() as session:
            return await fetch_server_info(session, url, model)

    return asyncio.run(go())


def test_server_info_comes_from_v1_models(gateway: FakeGateway) -> None:
    info = _info(gateway.url)
    assert info == ServerInfo(
        fake_gateway.MODEL, fake_gateway.MAX_MODEL_LEN, fake_gateway.VOCAB_SIZE
    )
    with pytest.raises(BenchError, match="does not serve model 'other'"):
        _info(gateway.url, "other")


def test_unreachable_gateway_is_a_bench_error() -> None:
    with pytest.raises(BenchError, match="cannot reach the gateway at http://127.0.0.1:1"):
        _info("http://127.0.0.1:1")


def test_streamed_tokens_are_counted_and_timed(gateway: FakeGateway) -> None:
    plan = [PlannedRequest(0, 0.0, 7, 5), PlannedRequest(1, 0.0, 3, 1)]
    records = _run(gateway, plan)
    assert [r.index for r in records] == [0, 1]
    for record, planned in zip(records, plan, strict=True):
        assert record.ok, record.error
        assert record.num_output_tokens == planned.output_tokens
        assert record.usage_completion_tokens == planned.output_tokens
        assert record.usage_prompt_tokens == planned.input_tokens
        assert record.finish_reason == "length"
        times = record.token_times_s
        assert record.send_s <= times[0] == record.first_token_s
        assert times == sorted(times) and times[-1] <= record.end_s
    # Five tokens in chunks of two: three chunk arrival times, shared by the tokens in a chunk.
    assert len(set(records[0].token_times_s)) == 3
    sent = gateway.requests[-2:]
    assert sorted(len(body["prompt"]) for body in sent) == [3, 7]
    for body in sent:
        assert body["model"] == fake_gateway.MODEL
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["return_token_ids"] is True and body["temperature"] == 0
        assert body["stream_options"] == {"include_usage": True}
        assert all(3 <= t < fake_gateway.VOCAB_SIZE for t in body["prompt"])


def test_requests_leave_at_their_arrival_times(gateway: FakeGateway) -> None:
    plan = [PlannedRequest(1, 0.15, 2, 2), PlannedRequest(0, 0.0, 2, 2)]
    records = _run(gateway, plan)
    assert records[0].send_s < 0.1
    assert 0.15 <= records[1].send_s < 0.5


def test_max_concurrency_caps_requests_in_flight(gateway: FakeGateway) -> None:
    gateway.max_in_flight = 0
    records = _run(gateway, [PlannedRequest(i, 0.0, 2, 6) for i in range(4)], max_concurrency=1)
    assert all(r.ok for r in records)
    assert gateway.max_in_flight == 1


def test_failures_are_recorded_not_raised(gateway: FakeGateway) -> None:
    plan = [
        PlannedRequest(0, 0.0, 2, fake_gateway.HTTP_ERROR_MAX_TOKENS),
        PlannedRequest(1, 0.0, 2, fake_gateway.STREAM_ERROR_MAX_TOKENS),
        PlannedRequest(2, 0.0, 2, fake_gateway.TRUNCATED_MAX_TOKENS),
        PlannedRequest(3, 0.0, 2, 4),
    ]
    records = _run(gateway, plan)
    assert records[0].error == "HTTP 400: bad request"
    assert records[1].error == "error event: replica died"
    assert records[2].error == "stream ended before [DONE]"
    assert records[3].ok
    assert all(r.end_s >= r.send_s for r in records)


def test_sse_lines_and_events() -> None:
    assert sse_data(b"data: {}\n") == "{}"
    assert sse_data(b"data:[DONE]\r\n") == "[DONE]"
    assert sse_data(b"\n") is None and sse_data(b": keep-alive\n") is None
    record = RequestRecord(0, 0.0, 1, 3, send_s=0.0)
    apply_event(record, {"choices": [{"text": "ab", "token_ids": [4, 5]}]}, now_s=0.5)
    apply_event(record, {"choices": [{"text": "c", "finish_reason": "length"}]}, now_s=0.7)
    usage = {"prompt_tokens": 1, "completion_tokens": 3, "exegpt_queue_s": 0.25,
             "exegpt_generation_s": 0.5}  # fmt: skip
    apply_event(record, {"choices": [], "usage": usage}, 0.8)
    assert (record.queue_s, record.generation_s) == (0.25, 0.5)
    assert record.token_times_s == [0.5, 0.5, 0.7]
    assert (record.first_token_s, record.finish_reason, record.usage_completion_tokens) == (
        0.5,
        "length",
        3,
    )
