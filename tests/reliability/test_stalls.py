"""The router under frozen, dead and slow replicas: explicit errors, retries, quick recovery."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import grpc
import httpx

from tests.reliability.procs import (
    free_port,
    generate_request,
    router_addresses,
    services,
    stream_in_background,
    wait_until,
    worker_stats,
)


def test_frozen_replica_streams_get_an_error_or_move_elsewhere(tmp_path: Path) -> None:
    with services(tmp_path) as group:
        workers = group.workers(["worker-a", "worker-b"])
        grpc_address, http_url = router_addresses(group.router([w.ready for w in workers]))
        streaming = stream_in_background(grpc_address, generate_request(900), 40, True)
        assert streaming.first_token.wait(30), streaming.details
        frozen, other = sorted(workers, key=lambda w: -worker_stats(w.ready).num_running)
        frozen.signal(signal.SIGSTOP)
        # Round robin sends the second of these to the frozen replica (still thought healthy).
        waiting = [stream_in_background(grpc_address, generate_request(5), 40, True) for _ in "ab"]

        assert streaming.done.wait(40)
        assert streaming.code is grpc.StatusCode.UNAVAILABLE, (streaming.code, streaming.details)
        assert f"replica {frozen.ready} stopped responding" in streaming.details
        for request in waiting:  # no token yet when the replica froze: retried on the other
            assert request.done.wait(40)
            assert request.code is grpc.StatusCode.OK, (request.code, request.details)
            assert request.num_tokens == 5
        assert worker_stats(other.ready).num_finished >= 2

        frozen.signal(signal.SIGCONT)
        healthy = lambda: httpx.get(f"{http_url}/health", timeout=5).json()["healthy_replicas"]  # noqa: E731
        wait_until(lambda: healthy() == 2, 10, "the thawed replica back in rotation")


def _count_connection_attempts(port: int, duration_s: float) -> list[float]:
    """Listen where a dead replica was; accept and drop every connection, noting when."""
    attempts: list[float] = []
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
        listener.settimeout(0.1)
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            attempts.append(time.monotonic())
            connection.close()
    return attempts


def test_replica_back_after_an_outage_is_used_again_within_seconds(tmp_path: Path) -> None:
    with services(tmp_path) as group:
        port = free_port()
        workers = group.workers(["worker-a", "worker-b"], [port, 0])
        _, http_url = router_addresses(group.router([w.ready for w in workers]))
        workers[0].process.kill()
        workers[0].process.wait()
        # An outage long enough for gRPC's default reconnect backoff to grow past 5 s.
        time.sleep(6)
        attempts = _count_connection_attempts(port, 6)
        assert len(attempts) >= 4, f"the router tried to reconnect only {len(attempts)} times"

        restarted = group.worker("worker-a", port)
        ready_s = time.monotonic()
        healthy = lambda: httpx.get(f"{http_url}/health", timeout=5).json()["healthy_replicas"]  # noqa: E731
        wait_until(lambda: healthy() == 2, 20, "the restarted replica back in rotation")
        assert time.monotonic() - ready_s < 5
        for _ in range(4):
            body = {"prompt": "hi", "max_tokens": 2, "ignore_eos": True}
            assert httpx.post(f"{http_url}/v1/completions", json=body, timeout=30).is_success
        assert worker_stats(restarted.ready).num_finished == 2


def test_request_timeout_caps_a_longer_client_deadline(tmp_path: Path) -> None:
    with services(tmp_path) as group:
        worker = group.worker("worker")
        flags = ("--request-timeout-s", "2", "--health-check-interval-s", "60")
        grpc_address, _ = router_addresses(group.router([worker.ready], extra=flags))
        worker.signal(signal.SIGSTOP)  # the router still thinks it healthy: the call hangs
        started = time.monotonic()
        outcome = stream_in_background(grpc_address, generate_request(5), 30, via_router=True)
        assert outcome.done.wait(40)
        assert outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED, outcome.details
        assert time.monotonic() - started < 15  # the router's 2 s cap, not the client's 30 s
        worker.signal(signal.SIGCONT)
