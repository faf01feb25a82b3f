"""Prometheus /metrics: the gateway's (router + every replica, aggregated over gRPC) and a
worker's own --metrics-port, scraped over HTTP and parsed with prometheus_client.parser."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BackgroundLoop, Stack, start_stack, stop_stack

PROMPTS = ([5, 6, 7], [8, 9, 10, 11, 12], [13, 14])
MAX_TOKENS = (4, 3, 5)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels without replica/model_name): value summed over them}."""
    summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(
                sorted((k, v) for k, v in sample.labels.items() if k not in ("replica",))
            )
            key = (sample.name, labels)
            summed[key] = summed.get(key, 0.0) + sample.value
    return summed


def total(parsed: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in parsed.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.fixture(scope="module")
def two_replicas(background_loop: BackgroundLoop) -> Iterator[Stack]:
    from services.router.policies import RouterPolicy
    from services.worker.config import EngineConfig

    running = start_stack(
        background_loop, [EngineConfig(max_batch_size=4)] * 2, policy=RouterPolicy.ROUND_ROBIN
    )
    yield running
    stop_stack(running)


def test_gateway_metrics_count_known_traffic(two_replicas: Stack) -> None:
    with httpx.Client(base_url=two_replicas.http_url, timeout=60) as http:
        for prompt, max_tokens in zip(PROMPTS, MAX_TOKENS, strict=True):
            answer = http.post(
                "/v1/completions",
                json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True},
            )
            assert answer.status_code == 200, answer.text
        scrape = http.get("/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["Content-Type"].startswith("text/plain")
    parsed = samples(scrape.text)
    model = (("model_name", "exegpt-tiny-t5"),)
    assert total(parsed, "vllm:prompt_tokens_total") == sum(len(p) for p in PROMPTS)
    assert total(parsed, "vllm:generation_tokens_total") == sum(MAX_TOKENS)
    assert total(parsed, "vllm:request_success_total", finished_reason="length") == 3
    for histogram in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        assert total(parsed, f"{histogram}_count") == 3, histogram
        assert total(parsed, f"{histogram}_bucket", le="+Inf") == 3, histogram
    # one interval between each two consecutive tokens of a request
    assert total(parsed, "vllm:time_per_output_token_seconds_count") == sum(MAX_TOKENS) - 3
    assert parsed[("vllm:num_requests_running", model)] == 0
    assert parsed[("vllm:num_requests_waiting", model)] == 0
    assert parsed[("vllm:kv_cache_usage_perc", model)] == 0
    assert parsed[("vllm:num_preemptions_total", model)] == 0
    # routing and replicas: both replicas answered, three decisions by round robin
    assert total(parsed, "exegpt:router_decisions_total", policy="round_robin") == 3
    assert total(parsed, "exegpt:replica_healthy") == 2
    assert total(parsed, "exegpt:replica_metrics_up") == 2
    assert total(parsed, "exegpt:schedule_info", kind="continuous") == 2
    assert total(parsed, "exegpt:schedule_control", variable="max_batch_size") == 8
    # every step that ran was timed at its (single, in-process) stage
    prefills = total(parsed, "exegpt:steps_total", phase="prefill")
    decodes = total(parsed, "exegpt:steps_total", phase="decode")
    assert prefills >= 1 and decodes >= max(MAX_TOKENS) - 1
    assert total(parsed, "exegpt:stage_step_seconds_count", stage="0", phase="prefill") == prefills
    assert total(parsed, "exegpt:stage_step_seconds_count", stage="0", phase="decode") == decodes
    assert total(parsed, "exegpt:step_rows_total", phase="decode") == sum(MAX_TOKENS) - 3


def test_gateway_metrics_label_each_replica(two_replicas: Stack) -> None:
    scrape = httpx.get(f"{two_replicas.http_url}/metrics", timeout=30)
    replicas = {
        sample.labels.get("replica")
        for family in text_string_to_metric_families(scrape.text)
        if family.name == "vllm:num_requests_running"
        for sample in family.samples
    }
    assert replicas == {worker.address for worker in two_replicas.workers}


def test_worker_metrics_port_needs_the_api_key(background_loop: BackgroundLoop) -> None:
    from exegpt.models.loader import load_model
    from exegpt.security import SecurityConfig
    from services.worker.config import WorkerConfig
    from services.worker.metrics import metrics_of
    from services.worker.server import start_worker

    config = WorkerConfig(port=0, metrics_port=0, security=SecurityConfig(api_key="sesame"))
    worker = background_loop.run(start_worker(config, load_model("exegpt-tiny-t5")))
    try:
        metrics = metrics_of(worker.engine, worker.loaded.name)
        assert metrics.http_runner is not None
        port = metrics.http_runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url, timeout=10).status_code == 401
        scrape = httpx.get(url, headers={"Authorization": "Bearer sesame"}, timeout=10)
        assert scrape.status_code == 200
        names = {family.name for family in text_string_to_metric_families(scrape.text)}
        assert {"vllm:num_requests_waiting", "vllm:prompt_tokens", "exegpt:schedule_info"} <= names
    finally:
        background_loop.run(worker.stop(0.5))
