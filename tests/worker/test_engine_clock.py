"""The engine's clock on a real replica: busy time split into forwards and host work by step
kind, read over gRPC (GetStats) and from the gateway's /metrics."""

from __future__ import annotations

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exegpt.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import BackgroundLoop, start_stack, stop_stack
from tests.wait import wait_until

PROMPTS = ([5, 6, 7], [8, 9, 10, 11, 12], [13, 14])
MAX_TOKENS = (6, 4, 5)


@pytest.fixture(scope="module")
def served(background_loop: BackgroundLoop):
    from services.worker.config import EngineConfig

    stack = start_stack(background_loop, [EngineConfig(max_batch_size=4)])
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        for prompt, max_tokens in zip(PROMPTS, MAX_TOKENS, strict=True):
            answer = http.post(
                "/v1/completions",
                json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True},
            )
            assert answer.status_code == 200, answer.text
        with grpc.insecure_channel(stack.workers[0].address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            # A step is charged after its tokens are delivered: wait for the last charge.
            rows = sum(MAX_TOKENS)
            wait_until(
                lambda: sum(t.num_rows for t in _stats(stub).step_totals) == rows,
                what="every step charged",
            )
            stats = _stats(stub)
        scrape = http.get("/metrics").text
    yield stats, scrape
    stop_stack(stack)


def _stats(stub: worker_pb2_grpc.WorkerStub) -> worker_pb2.WorkerStats:
    return stub.GetStats(worker_pb2.GetStatsRequest())


def test_every_step_is_charged_to_its_kind(served) -> None:
    stats, _ = served
    totals = {t.kind: t for t in stats.step_totals}
    assert set(totals) == {"prefill", "decode"}
    # Each request is prefilled once (its first token) and decoded for the rest.
    assert totals["prefill"].num_rows == len(PROMPTS)
    assert totals["decode"].num_rows == sum(MAX_TOKENS) - len(PROMPTS)
    assert totals["decode"].num_steps >= max(MAX_TOKENS) - 1
    for kind in totals.values():
        assert kind.forward_s > 0 and kind.host_s > 0, kind
        # In process a step's forward fits between two marks: nothing is capped.
        assert kind.compute_s == pytest.approx(kind.forward_s), kind


def test_a_step_that_overlapped_others_keeps_its_whole_compute() -> None:
    # A WAA encode on its own device finishes just after a decode step: its share of the
    # engine's wall time is a sliver, which caps its forward (the busy fraction stays a
    # fraction), but its compute is counted whole for calibration.
    from services.worker.engine_clock import EngineClock, busy_fraction

    clock = EngineClock()
    clock.start_busy()
    clock.charge("decode", 8, 0.0)
    clock.charge("prefill", 4, 0.5)  # reported by its stages; microseconds of wall since
    prefill = next(t for t in clock.totals() if t.kind == "prefill")
    assert prefill.compute_s == 0.5
    assert prefill.forward_s < 0.01 and prefill.host_s == 0.0
    assert 0.0 <= busy_fraction(clock.totals()) <= 1.0
    (band,) = [t for t in clock.totals_by_rows() if t.kind == "prefill"]
    assert band.compute_s == 0.5


def test_the_steps_by_rows_add_up_to_their_kind_s_totals(served) -> None:
    stats, _ = served
    assert stats.step_totals_by_rows
    for kind in stats.step_totals:
        assert kind.min_rows == 0  # the kind's totals cover every step
        bands = [t for t in stats.step_totals_by_rows if t.kind == kind.kind]
        assert sum(t.num_steps for t in bands) == kind.num_steps
        assert sum(t.num_rows for t in bands) == kind.num_rows
        assert sum(t.forward_s for t in bands) == pytest.approx(kind.forward_s)
        assert sum(t.host_s for t in bands) == pytest.approx(kind.host_s)
        for band in bands:  # every step of a band has min_rows .. 2 x min_rows - 1 rows
            assert band.min_rows * band.num_steps <= band.num_rows
            assert band.num_rows <= (2 * band.min_rows - 1) * band.num_steps


def test_a_step_is_kept_in_the_power_of_two_band_of_its_rows() -> None:
    from services.worker.engine_clock import EngineClock, rows_band

    assert [rows_band(n) for n in (1, 2, 3, 4, 7, 8, 255, 256, 257)] == [
        1, 2, 2, 4, 4, 8, 128, 256, 256,
    ]  # fmt: skip
    clock = EngineClock()
    clock.start_busy()
    for kind, rows in (("decode", 3), ("decode", 2), ("decode", 5), ("prefill", 1)):
        clock.charge(kind, rows, 0.0)
    bands = {(t.kind, t.min_rows): (t.num_steps, t.num_rows) for t in clock.totals_by_rows()}
    assert bands == {("decode", 2): (2, 5), ("decode", 4): (1, 5), ("prefill", 1): (1, 1)}


def test_busy_fraction_is_forward_time_over_busy_wall_time(served) -> None:
    stats, scrape = served
    forward_s = sum(t.forward_s for t in stats.step_totals)
    wall_s = forward_s + sum(t.host_s for t in stats.step_totals)
    assert 0 < stats.busy_fraction < 1
    assert stats.busy_fraction == pytest.approx(forward_s / wall_s)
    gauges = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(scrape)
        if family.name == "exegpt:engine_busy_fraction"
    }
    assert gauges["exegpt:engine_busy_fraction"] == pytest.approx(stats.busy_fraction)
    seconds = [
        sample
        for family in text_string_to_metric_families(scrape)
        if family.name == "exegpt:engine_seconds"
        for sample in family.samples
        if sample.labels.get("phase") == "decode" and sample.labels.get("part") == "forward"
    ]
    decode = next(t for t in stats.step_totals if t.kind == "decode")
    assert seconds and seconds[0].value == pytest.approx(decode.forward_s)


def test_head_waits_reach_get_stats_by_cause(background_loop: BackgroundLoop) -> None:
    """A replica that runs one request at a time, busy with a long one: two more requests
    wait for its batch slot, and GetStats carries those waits under their cause."""
    from concurrent.futures import ThreadPoolExecutor

    from services.worker.config import EngineConfig

    stack = start_stack(background_loop, [EngineConfig(max_batch_size=1)])
    try:
        with (
            httpx.Client(base_url=stack.http_url, timeout=120) as http,
            grpc.insecure_channel(stack.workers[0].address) as channel,
            ThreadPoolExecutor(len(PROMPTS)) as pool,
        ):
            stub = worker_pb2_grpc.WorkerStub(channel)

            def complete(prompt: list[int], max_tokens: int) -> int:
                body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
                return http.post("/v1/completions", json=body).status_code

            long = pool.submit(complete, PROMPTS[0], 200)
            wait_until(lambda: _stats(stub).num_running == 1, what="the long request running")
            short = [pool.submit(complete, prompt, 2) for prompt in PROMPTS[1:]]
            assert [f.result() for f in [long, *short]] == [200] * len(PROMPTS)
            waits = dict(_stats(stub).head_waits)
        assert waits.get("batch", 0) > 0, waits
        assert set(waits) <= {"free_blocks", "policy", "batch", "preempted", "chunk_budget"}
    finally:
        stop_stack(stack)
