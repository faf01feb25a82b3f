"""A request the engine fails on is that request's failure: never UNAVAILABLE, never retried.

The workers serve a checkpoint whose embedding row for one token is NaN (with an untied
head, so other requests' logits stay finite): a prompt holding that token makes the model
produce non-finite logits for that request alone. It must get an error of its own (HTTP 500
JSON / gRPC INTERNAL) while the streams beside it on both replicas finish, and no replica
is marked unhealthy (a poison request must not reach, or take down, a second replica).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx

from exegpt.v1 import generate_pb2
from tests.reliability.poison import POISON_TOKEN, save_poisoned_model
from tests.reliability.procs import (
    generate_request,
    router_addresses,
    services,
    stream_in_background,
    worker_stats,
)

LONG_TOKENS = 200


def poisoned_request() -> generate_pb2.GenerateRequest:
    request = generate_request(4, temperature=0.0)
    request.token_ids.ids.append(POISON_TOKEN)
    return request


def test_a_request_the_model_fails_on_fails_alone(tmp_path: Path) -> None:
    model = save_poisoned_model(tmp_path / "poisoned")
    with services(tmp_path) as group:
        workers = group.workers(["worker-a", "worker-b"], extra=("--model", str(model)))
        router = group.router([w.ready for w in workers], extra=("--policy", "round_robin"))
        grpc_address, http_url = router_addresses(router)

        # One long greedy stream running on each replica (round robin) before the poison.
        long_streams = [
            stream_in_background(
                grpc_address, generate_request(LONG_TOKENS, temperature=0.0), 120, via_router=True
            )
            for _ in workers
        ]
        for stream in long_streams:
            assert stream.first_token.wait(60), stream.details
        assert [worker_stats(w.ready).num_running for w in workers] == [1, 1]

        direct = stream_in_background(workers[0].ready, poisoned_request(), 60, via_router=False)
        routed = stream_in_background(grpc_address, poisoned_request(), 60, via_router=True)
        response = httpx.post(
            f"{http_url}/v1/completions",
            json={"prompt": [3, POISON_TOKEN], "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert response.status_code == 500, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert "non-finite" in response.json()["error"]["message"]
        for poisoned in (direct, routed):
            assert poisoned.done.wait(60)
            assert poisoned.code is grpc.StatusCode.INTERNAL, (poisoned.code, poisoned.details)

        for stream in long_streams:
            assert stream.done.wait(120)
            assert stream.code is grpc.StatusCode.OK, stream.details
            assert stream.num_tokens == LONG_TOKENS
        health = httpx.get(f"{http_url}/health", timeout=10).json()
        assert health["healthy_replicas"] == 2, health
        body = {"prompt": [3, 4], "max_tokens": 8, "temperature": 0}
        ok = httpx.post(f"{http_url}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
