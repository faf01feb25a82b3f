"""A request the engine fails on is that request's failure: never UNAVAILABLE, never retried.

The poison request is the one from issue 14 (a temperature so small that sampling produced
NaN and the engine failed its whole running batch). Whatever the engine does with it, it
must not reach a second replica: a long stream on the other replica finishes, and both
replicas stay healthy.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx

from tests.reliability.procs import (
    generate_request,
    router_addresses,
    services,
    stream_in_background,
    worker_stats,
)

POISON = {"prompt": "x", "max_tokens": 4, "temperature": 1e-40}
LONG_TOKENS = 900


def test_engine_error_is_not_unavailable_and_not_spread(tmp_path: Path) -> None:
    with services(tmp_path) as group:
        workers = group.workers(["worker-a", "worker-b"])
        grpc_address, http_url = router_addresses(group.router([w.ready for w in workers]))

        # Straight to a worker: a failure of this request, not of the replica.
        poisoned = stream_in_background(
            workers[0].ready, generate_request(4, temperature=1e-40), 30, via_router=False
        )
        assert poisoned.done.wait(30)
        assert poisoned.code is not grpc.StatusCode.UNAVAILABLE, poisoned.details

        # One long stream running on each replica (round robin), then the poison request.
        long_streams = [
            stream_in_background(grpc_address, generate_request(LONG_TOKENS), 60, via_router=True)
            for _ in workers
        ]
        for stream in long_streams:
            assert stream.first_token.wait(30), stream.details
        assert [worker_stats(w.ready).num_running for w in workers] == [1, 1]
        response = httpx.post(f"{http_url}/v1/completions", json=POISON, timeout=30)
        # Refused, failed alone, or served by a NaN-safe sampler: never "no replica" (503).
        assert response.status_code in (200, 400, 500), response.text
        assert response.headers["Content-Type"].startswith("application/json")

        for stream in long_streams:
            assert stream.done.wait(60)
        finished = [s for s in long_streams if s.code is grpc.StatusCode.OK]
        assert finished, [s.details for s in long_streams]  # the poison reached one replica
        assert all(s.num_tokens == LONG_TOKENS for s in finished)
        health = httpx.get(f"{http_url}/health", timeout=10).json()
        assert health["healthy_replicas"] == 2, health
