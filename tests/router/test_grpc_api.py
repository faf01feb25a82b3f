"""The router's gRPC API through the SDK (sync and asyncio), health, errors and tracing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exegpt.sdk import AsyncClient, Client, ExegptError
from tests.conftest import Stack


def test_generate_returns_typed_completion(stack: Stack) -> None:
    with Client(stack.grpc_address) as client:
        completion = client.generate("Hi", max_tokens=6, ignore_eos=True)
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == completion.completion_tokens == 6
    assert completion.prompt_tokens == 2
    assert len(completion.token_times_s) == 6
    assert 0 < completion.ttft_s <= completion.token_times_s[-1]
    assert completion.token_times_s == sorted(completion.token_times_s)


def test_stream_matches_generate(stack: Stack) -> None:
    with Client(stack.grpc_address) as client:
        whole = client.generate([3, 4, 5, 6], max_tokens=7, ignore_eos=True)
        chunks = list(client.stream([3, 4, 5, 6], max_tokens=7, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 7
    assert [c.arrival_s for c in chunks] == sorted(c.arrival_s for c in chunks)


def test_async_client(stack: Stack) -> None:
    async def go() -> tuple[list[int], list[int]]:
        async with AsyncClient(stack.grpc_address) as client:
            whole = await client.generate([9, 8, 7], max_tokens=5, ignore_eos=True)
            streamed = [
                t
                async for c in client.stream([9, 8, 7], max_tokens=5, ignore_eos=True)
                for t in c.token_ids
            ]
            return whole.token_ids, streamed

    whole, streamed = asyncio.run(go())
    assert whole == streamed and len(whole) == 5


def test_concurrent_requests_batch_and_match_sequential(stack: Stack) -> None:
    prompts = [[3 + i] * (4 + 3 * i) for i in range(6)]
    with Client(stack.grpc_address) as client:
        sequential = [client.generate(p, max_tokens=8, ignore_eos=True).token_ids for p in prompts]

    async def together() -> list[list[int]]:
        async with AsyncClient(stack.grpc_address) as client:
            results = await asyncio.gather(
                *(client.generate(p, max_tokens=8, ignore_eos=True) for p in prompts)
            )
            return [r.token_ids for r in results]

    assert asyncio.run(together()) == sequential


@pytest.mark.parametrize(
    ("prompt", "options", "code"),
    [
        ("", {"max_tokens": 3}, "invalid_argument"),
        ("hi", {"max_tokens": 0}, "invalid_argument"),
        ([500], {"max_tokens": 3}, "invalid_argument"),
        ("hi", {"max_tokens": 3, "temperature": -1.0}, "invalid_argument"),
    ],
)
def test_bad_input_is_invalid_argument(stack: Stack, prompt, options, code) -> None:
    with Client(stack.grpc_address) as client:
        with pytest.raises(ExegptError) as failure:
            client.generate(prompt, **options)
        assert failure.value.code == code
        assert client.generate("fine", max_tokens=1).completion_tokens == 1


def test_unknown_model_is_not_found(stack: Stack) -> None:
    with Client(stack.grpc_address, model="nope") as client:
        with pytest.raises(ExegptError) as failure:
            client.generate("hi", max_tokens=1)
    assert failure.value.code == "not_found"


def test_deadline_is_enforced(stack: Stack) -> None:
    with Client(stack.grpc_address, timeout_s=0.05) as client:
        with pytest.raises(ExegptError) as failure:
            client.generate("hi", max_tokens=1000, ignore_eos=True)
    assert failure.value.code == "deadline_exceeded"


def test_every_service_serves_grpc_health(stack: Stack) -> None:
    for address in [stack.grpc_address, *(w.address for w in stack.workers)]:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_router_and_worker_spans_share_one_trace(stack: Stack, spans) -> None:
    with Client(stack.grpc_address) as client:
        client.generate("trace me", max_tokens=3, ignore_eos=True)
    finished = spans.get_finished_spans()
    by_name = {span.name: span for span in finished}
    for name in (
        "router.Generate", "router.generate", "worker.generate",
        "worker.queue_wait", "worker.prefill", "worker.decode",
    ):  # fmt: skip
        assert name in by_name, f"missing span {name}; got {sorted(by_name)}"
    request_spans = [s for s in finished if not s.name.startswith("engine.")]
    assert len({span.context.trace_id for span in request_spans}) == 1
    # A step serves many requests: its span is its own trace, linked to each request's span.
    # (Other tests' requests may still be stepping: look at the steps linked to this one.)
    worker_context = by_name["worker.generate"].context
    steps = [
        s
        for s in finished
        if s.name.startswith("engine.")
        and any(link.context.span_id == worker_context.span_id for link in s.links)
    ]
    assert {s.name for s in steps} == {"engine.prefill", "engine.decode"}
    assert len(steps) == 3  # one prefill, then a decode for each of the other 2 tokens
    worker_span = by_name["worker.generate"]
    assert worker_span.parent is not None
    assert worker_span.parent.span_id == by_name["router.generate"].context.span_id
    assert by_name["worker.prefill"].parent.span_id == worker_span.context.span_id
