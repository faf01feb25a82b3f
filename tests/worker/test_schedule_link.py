"""The loop closed, with real processes: a scheduler service, workers started with
`--scheduler`, and a router. A plan activated at the scheduler is run by the worker; a
drift from task S to task G-shaped traffic makes the scheduler push a new schedule that the
worker applies; a worker keeps serving while the scheduler is down and resubscribes when it
is back (also after a restart that numbers its versions from 1 again)."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from exegpt.v1 import (
    generate_pb2,
    router_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.reliability.procs import (
    REPO_ROOT,
    Service,
    Services,
    free_port,
    generate_request,
    router_addresses,
    services,
    wait_until,
)

REPORT_INTERVAL_S = "0.3"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exegpt.models.loader import save_default_model

    return save_default_model(tmp_path_factory.mktemp("model") / "exegpt-tiny-t5")


def scheduler_args(model_dir: Path, port: int = 0, *, profile: bool = True) -> list[str]:
    args = ["--port", str(port), "--model-config", str(model_dir), "--kinds", "rra"]
    args += ["--devices", "1", "--latency-bound", "1"]
    return args + (["--profile", "analytic:a40", "--workload", "task:S"] if profile else [])


def start_worker(group: Services, scheduler: str) -> Service:
    extra = ("--scheduler", scheduler, "--report-interval-s", REPORT_INTERVAL_S)
    return group.worker("worker", extra=extra)


def get_schedule(address: str) -> worker_pb2.ScheduleStatus:
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        return stub.GetSchedule(worker_pb2.GetScheduleRequest(), timeout=10)


def activate(scheduler: str) -> scheduler_pb2.PlanResponse:
    request = scheduler_pb2.PlanRequest(
        profile="analytic:a40", workload="task:T", latency_bound_s=2.0, activate=True
    )
    with grpc.insecure_channel(scheduler) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).Plan(request, timeout=60)


def generate(address: str, num_tokens: int = 4) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        return sum(
            len(c.token_ids) for c in stub.Generate(generate_request(num_tokens), timeout=60)
        )


def runs_version(address: str, version: int, reason: str) -> bool:
    """The worker runs `version` (the engine switched to it), else nudge it with a request:
    an idle engine takes a pushed schedule at its next step boundary."""
    status = get_schedule(address)
    if status.version == version and status.reason == reason and status.source == "scheduler":
        return True
    if status.pending_version == version:
        generate(address, 1)
    return False


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def exegpt_up(log_dir: Path, scheduler: str) -> Iterator[tuple[str, str]]:
    """`exegpt up --scheduler` with one replica: (worker address, gateway URL)."""
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--replicas", "1",
        "--torch-threads", "1", "--http-port", "0", "--grpc-port", "0", "--log-dir", str(log_dir),
        "--scheduler", scheduler,
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        assert "ready" in line, line
        http_url = re.search(r"http=(\S+)", line).group(1)  # type: ignore[union-attr]
        worker = re.search(r"replicas=(\S+)", line).group(1)  # type: ignore[union-attr]
        yield worker, http_url
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()


def test_up_with_a_scheduler_runs_an_activated_plan(tmp_path: Path, model_dir) -> None:
    with services(tmp_path) as group:
        scheduler = group.start(
            "scheduler", "services.scheduler", scheduler_args(model_dir, profile=False)
        )
        with exegpt_up(tmp_path / "up", scheduler.ready) as (worker, http_url):
            wait_until(lambda: get_schedule(worker).scheduler_connected, 20, "subscription")
            before = get_schedule(worker)
            assert (before.source, before.version, before.kind) == ("flags", 0, "continuous")
            assert not before.HasField("prediction")

            plan = activate(scheduler.ready)
            assert plan.version == 1
            wait_until(lambda: runs_version(worker, 1, "requested"), 20, "schedule v1 to run")
            assert generate(worker, 6) == 6
            status = get_schedule(worker)
            assert status.kind == plan.chosen.schedule.kind == "rra"
            assert status.schedule == plan.chosen.schedule
            assert status.placement_json == ""  # in process: control variables only
            assert status.prediction.throughput_seq_s == pytest.approx(plan.chosen.throughput_seq_s)
            assert status.prediction.latency_s == pytest.approx(plan.chosen.latency_s)
            assert status.prediction.workload == "task:T"
            assert [s.schedule.kind for s in status.switches] == ["rra"]
            assert status.num_finished >= 1 and status.measured_throughput_seq_s > 0
            assert status.measured_p99_length_latency_s > 0

            body = http_json(f"{http_url}/schedule")
            (replica,) = body["data"]
            assert replica["address"] == worker and replica["version"] == 1
            assert replica["schedule"]["kind"] == "rra" and replica["source"] == "scheduler"
            assert replica["prediction"]["throughput_seq_s"] == pytest.approx(
                plan.chosen.throughput_seq_s
            )
            assert replica["measured"]["num_finished"] >= 1
            assert replica["placement"] is None and len(replica["switches"]) == 1
            assert replica["scheduler"] == scheduler.ready and replica["scheduler_connected"]


def g_shaped_requests(num: int, seed: int = 7) -> Iterator[generate_pb2.GenerateRequest]:
    """Task G's shape: short inputs (mean 64), long outputs (here 120-220 tokens)."""
    rng = random.Random(seed)
    for index in range(num):
        prompt = [rng.randrange(3, 380) for _ in range(max(8, int(rng.gauss(64, 23))))]
        yield generate_pb2.GenerateRequest(
            request_id=f"g{index}",
            token_ids=generate_pb2.TokenIds(ids=prompt),
            sampling=generate_pb2.SamplingParams(
                max_tokens=rng.randrange(120, 220), temperature=0.0, ignore_eos=True
            ),
        )


def test_a_drift_from_task_s_to_task_g_pushes_a_schedule_the_worker_runs(
    tmp_path: Path, model_dir
) -> None:
    with services(tmp_path) as group:
        drift = ["--min-observations", "24", "--replan-min-interval", "0"]
        drift += ["--stage-time-threshold", "inf"]  # an A40's roofline is no CPU's: lengths only
        scheduler = group.start(
            "scheduler", "services.scheduler", [*scheduler_args(model_dir), *drift]
        )
        worker = start_worker(group, scheduler.ready)
        wait_until(lambda: runs_version(worker.ready, 1, "initial"), 20, "the initial schedule")
        router = group.router([worker.ready])
        grpc_address, http_url = router_addresses(router)

        def through_router(request: generate_pb2.GenerateRequest) -> int:
            with grpc.insecure_channel(grpc_address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                return len(stub.Generate(request, timeout=60).token_ids)

        requests = list(g_shaped_requests(28))
        with ThreadPoolExecutor(len(requests)) as pool:
            lengths = list(pool.map(through_router, requests))
        assert lengths == [r.sampling.max_tokens for r in requests]

        wait_until(lambda: runs_version(worker.ready, 2, "length-drift"), 20, "the re-plan")
        with grpc.insecure_channel(scheduler.ready) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            watch = stub.WatchSchedule(scheduler_pb2.WatchScheduleRequest(after_version=1))
            update = next(watch)
            watch.cancel()
        assert update.version == 2
        assert update.reason == scheduler_pb2.REPLAN_REASON_LENGTH_DRIFT
        assert update.drift.output.drifted and update.drift.output.observed_mean_tokens > 120
        assert update.mean_output_tokens > 120 and update.mean_input_tokens < 100
        assert json.loads(update.placement_json)["stages"]  # the simulator's layout rides along
        status = get_schedule(worker.ready)
        assert status.schedule == update.schedule and status.kind == update.schedule.kind
        assert status.prediction.throughput_seq_s == pytest.approx(
            update.prediction.throughput_seq_s
        )
        (replica,) = http_json(f"{http_url}/schedule")["data"]
        assert (replica["version"], replica["reason"]) == (2, "length-drift")


def test_the_worker_serves_without_the_scheduler_and_resubscribes(
    tmp_path: Path, model_dir
) -> None:
    port = free_port()
    with services(tmp_path) as group:
        scheduler = group.start("scheduler", "services.scheduler", scheduler_args(model_dir, port))
        worker = start_worker(group, scheduler.ready)
        wait_until(lambda: runs_version(worker.ready, 1, "initial"), 20, "the initial schedule")
        activate(scheduler.ready)
        wait_until(lambda: runs_version(worker.ready, 2, "requested"), 20, "schedule v2")

        scheduler.signal(signal.SIGKILL)
        scheduler.process.wait(10)
        wait_until(lambda: not get_schedule(worker.ready).scheduler_connected, 20, "the drop")
        assert [generate(worker.ready, 5) for _ in range(3)] == [5, 5, 5]
        status = get_schedule(worker.ready)
        assert (status.version, status.kind) == (2, "rra")  # the last schedule is kept

        # Back on its port, the scheduler numbers from 1 again: the worker notices (its
        # reports say v1 < v2) and watches from the start, so it runs the new v1.
        group.start("scheduler-again", "services.scheduler", scheduler_args(model_dir, port))
        wait_until(lambda: runs_version(worker.ready, 1, "initial"), 30, "the restarted v1")
        assert get_schedule(worker.ready).scheduler_connected
        assert activate(scheduler.ready).version == 2
        wait_until(lambda: runs_version(worker.ready, 2, "requested"), 20, "the new v2")
        assert generate(worker.ready, 3) == 3


def test_measured_stage_times_far_from_the_profile_push_a_recalibrated_schedule(
    tmp_path: Path, model_dir
) -> None:
    """An A40's roofline predicts far shorter steps than this CPU takes: the stage times the
    worker reports make the scheduler re-plan with its costs scaled (STAGE_TIME_DRIFT)."""
    with services(tmp_path) as group:
        drift = ["--min-stage-observations", "20", "--replan-min-interval", "0"]
        scheduler = group.start(
            "scheduler", "services.scheduler", [*scheduler_args(model_dir), *drift]
        )
        worker = start_worker(group, scheduler.ready)
        wait_until(lambda: runs_version(worker.ready, 1, "initial"), 20, "the initial schedule")
        for _ in range(4):
            assert generate(worker.ready, 12) == 12
        wait_until(lambda: runs_version(worker.ready, 2, "stage-time-drift"), 20, "the re-plan")
        with grpc.insecure_channel(scheduler.ready) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            watch = stub.WatchSchedule(scheduler_pb2.WatchScheduleRequest(after_version=1))
            update = next(watch)
            watch.cancel()
        assert update.reason == scheduler_pb2.REPLAN_REASON_STAGE_TIME_DRIFT
        ratios = (update.drift.encode_time_ratio, update.drift.decode_time_ratio)
        assert max(ratios) > 1.25, ratios
        assert update.prediction.latency_s > 0
