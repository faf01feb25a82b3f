"""The engine's queue seconds reach every client, and the replica's p99-length latency leaves
them out: one replica with one batch slot, so concurrent requests wait for each other."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from exegpt.sdk import Client
from exegpt.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import BackgroundLoop, Stack, start_stack, stop_stack

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def one_slot(background_loop: BackgroundLoop):
    from services.worker.config import EngineConfig

    stack = start_stack(background_loop, [EngineConfig(max_batch_size=1, max_queue_size=16)])
    yield stack
    stop_stack(stack)


def test_sdk_results_carry_the_wait_before_admission(one_slot: Stack) -> None:
    with Client(one_slot.grpc_address) as client, ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(
                lambda p: client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True),
                ([5, 6, 7], [8, 9, 10], [11, 12, 13]),
            )
        )
        chunks = list(client.stream([5, 6], max_tokens=3, ignore_eos=True))
    for result in results:
        # Admitted after the engine got it and before its first token.
        assert 0 < result.queue_s < result.token_times_s[0]
        assert result.generation_s > 0  # then admission to last token
    # Streamed, the last chunk carries it with the usage.
    assert chunks[-1].finish_reason == "length" and chunks[-1].queue_s > 0
    assert chunks[-1].generation_s > 0
    # One slot: the last admitted waited for at least one whole other generation.
    generations = sorted(r.generation_s for r in results)
    assert max(r.queue_s for r in results) > generations[0]

    with grpc.insecure_channel(one_slot.workers[0].address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        status = stub.GetSchedule(worker_pb2.GetScheduleRequest())
    assert status.measured_p99_output_tokens == MAX_TOKENS
    # The replica's p99-length latency is admission to last token: the queueing is not in it.
    mean_e2e_s = sum(r.latency_s for r in results) / len(results)
    assert 0 < status.measured_p99_length_latency_s < mean_e2e_s


def test_http_usage_reports_the_queue_seconds(one_slot: Stack) -> None:
    with httpx.Client(base_url=one_slot.http_url, timeout=60) as http:
        body = http.post(
            "/v1/completions",
            json={"prompt": [5, 6], "max_tokens": 3, "ignore_eos": True, "n": 2},
        ).json()
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    # n=2 on one slot: one choice waited for the other; the longest wait is reported.
    assert isinstance(usage["exegpt_queue_s"], float) and usage["exegpt_queue_s"] > 0
    assert isinstance(usage["exegpt_generation_s"], float) and usage["exegpt_generation_s"] > 0


def test_openai_client_reads_the_extra_usage_field(one_slot: Stack) -> None:
    client = openai.OpenAI(base_url=f"{one_slot.http_url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model="exegpt-tiny-t5", prompt=[7, 8, 9], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    usage = list(stream)[-1].usage
    assert usage is not None and usage.completion_tokens == 4
    assert usage.model_extra["exegpt_queue_s"] > 0
    assert usage.model_extra["exegpt_generation_s"] > 0
