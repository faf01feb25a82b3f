"""The Scheduler gRPC service: real servers on port 0, real grpc.aio channels, real planner.

Drift is driven by synthetic observation streams (task S lengths, then task C2 lengths;
stage times off the profile's prediction) and seen as new schedule versions pushed to a
watching replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exegpt.v1 import scheduler_pb2, scheduler_pb2_grpc
from exegpt.workloads import get_task
from services.scheduler.analytic_cost import analytic_cost_model
from services.scheduler.calibration import predict_stage_s
from services.scheduler.config import DriftThresholds, SchedulerConfig
from services.scheduler.convert import schedule_from_proto
from services.scheduler.observations import StageKind, StageTimeObservation
from services.scheduler.problem import WorkloadDistribution
from services.scheduler.server import RunningScheduler, start_scheduler
from tests.conftest import BackgroundLoop

PROFILE = "analytic:a40:opt-13b"
BOUND_S = 20.0
NUM_DEVICES = 4
TIMEOUT_S = 30.0


def drift_config(**overrides: object) -> SchedulerConfig:
    options: dict[str, object] = {
        "profile": PROFILE,
        "workload": "task:S",
        "latency_bound_s": BOUND_S,
        "num_devices": NUM_DEVICES,
        "device_memory_bytes": 48 * 2**30,
        "drift": DriftThresholds(min_observations=100, min_stage_observations=10),
        "length_window_size": 200,
        "stage_window_size": 50,
        "replan_min_interval_s": 0.0,
        "max_subscribers": 4,
    }
    options.update(overrides)
    return SchedulerConfig(**options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scheduler(background_loop: BackgroundLoop) -> Iterator[RunningScheduler]:
    running = background_loop.run(start_scheduler(drift_config()))
    yield running
    background_loop.run(running.stop(0.5))


def stub(address: str) -> tuple[grpc.aio.Channel, scheduler_pb2_grpc.SchedulerStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, scheduler_pb2_grpc.SchedulerStub(channel)


def lengths(task_id: str, num: int, seed: int) -> tuple[list[int], list[int]]:
    task = get_task(task_id)
    rng = np.random.default_rng(seed)
    return task.input.sample(num, rng).tolist(), task.output.sample(num, rng).tolist()


async def length_reports(
    task_id: str, num: int, seed: int, batch: int = 50
) -> AsyncIterator[scheduler_pb2.WorkloadReport]:
    inputs, outputs = lengths(task_id, num, seed)
    for start in range(0, num, batch):
        yield scheduler_pb2.WorkloadReport(
            replica_id="replica-0",
            input_tokens=inputs[start : start + batch],
            output_tokens=outputs[start : start + batch],
        )


async def next_update(
    updates: AsyncIterator[scheduler_pb2.ScheduleUpdate],
) -> scheduler_pb2.ScheduleUpdate:
    return await asyncio.wait_for(anext(updates), TIMEOUT_S)


# ---- Plan ----------------------------------------------------------------------------------


def test_plan_returns_a_schedule_for_task_s(
    scheduler: RunningScheduler, background_loop: BackgroundLoop
) -> None:
    async def go() -> scheduler_pb2.PlanResponse:
        channel, client = stub(scheduler.address)
        async with channel:
            request = scheduler_pb2.PlanRequest(
                profile=PROFILE, workload="task:S", latency_bound_s=BOUND_S, num_devices=4
            )
            return await client.Plan(request, timeout=TIMEOUT_S)

    response = background_loop.run(go())
    assert response.meets_bound and response.HasField("chosen")
    schedule = schedule_from_proto(response.chosen.schedule)
    # The best predicted schedule, whatever its kind (the baselines compete too).
    feasible = {k: p for k, p in response.best_by_kind.items() if p.feasible}
    assert schedule.kind.value == max(feasible, key=lambda k: feasible[k].throughput_seq_s)
    assert 0 < response.chosen.latency_s <= BOUND_S
    assert response.chosen.throughput_seq_s > 0
    assert response.workload == "task:S" and response.version == 0
    assert response.num_evaluations > 0
    assert set(response.best_by_kind) >= {schedule.kind.value}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workload": "task:X"}, "unknown task"),
        ({"workload": "nonsense"}, "unknown workload"),
        ({"latency_bound_s": 0.0}, "the latency bound must be positive"),
        ({"latency_bound_s": -2.0}, "the latency bound must be positive"),
        ({"num_devices": 0}, "the number of devices must be at least 1"),
        ({"num_devices": -3}, "the number of devices must be at least 1"),
        ({"device_memory_bytes": 0}, "the device memory must be positive"),
        ({"device_memory_bytes": 1000}, "no configuration fits in memory"),
        ({"num_devices": 1, "kinds": ["waa-c"]}, "WAA needs at least 2 devices"),
        ({"num_devices": 16, "tp_degrees": [16]}, "no timings for TP degree 16"),
        ({"tp_degrees": [8]}, "contradictory options: TP degree 8"),
        ({"latency_bound_s": 3.0, "no_latency_bound": True}, "contradictory options"),
        ({"kinds": ["static"]}, "is a baseline"),
        ({"kinds": ["fastest"]}, "unknown schedule kind"),
        ({"profile": "analytic:tpu-v9"}, "unknown analytic device"),
        ({"profile": "/nonexistent/profile.json"}, "outside the allowed directories"),
    ],
)
def test_bad_plan_requests_are_invalid_argument(
    scheduler: RunningScheduler, background_loop: BackgroundLoop, fields: dict, message: str
) -> None:
    async def go() -> grpc.aio.AioRpcError:
        channel, client = stub(scheduler.address)
        async with channel:
            request = scheduler_pb2.PlanRequest(profile=PROFILE, num_devices=4)
            for name, value in fields.items():
                if isinstance(value, list):
                    getattr(request, name).extend(value)
                else:
                    setattr(request, name, value)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await client.Plan(request, timeout=TIMEOUT_S)
            return failure.value

    error = background_loop.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")


# ---- WatchSchedule, health, bad reports ------------------------------------------------------


def test_watch_receives_the_initial_schedule(
    scheduler: RunningScheduler, background_loop: BackgroundLoop
) -> None:
    async def go() -> scheduler_pb2.ScheduleUpdate:
        channel, client = stub(scheduler.address)
        async with channel:
            call = client.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id="r0"))
            update = await next_update(call.__aiter__())
            call.cancel()
            return update

    update = background_loop.run(go())
    assert update.version == 1
    assert update.reason == scheduler_pb2.REPLAN_REASON_INITIAL
    assert update.workload == "task:S" and update.latency_bound_s == BOUND_S
    task_s = WorkloadDistribution.from_task("S")
    assert update.p99_output_tokens == task_s.output_p99_tokens and update.meets_bound
    assert update.mean_output_tokens == pytest.approx(task_s.mean_output_tokens)
    assert update.schedule == update.prediction.schedule
    assert not update.HasField("drift")


def test_health_check_is_serving(
    scheduler: RunningScheduler, background_loop: BackgroundLoop
) -> None:
    async def go() -> int:
        async with grpc.aio.insecure_channel(scheduler.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            return response.status

    assert background_loop.run(go()) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (scheduler_pb2.WorkloadReport(input_tokens=[10, 0]), "between 1 and"),
        (scheduler_pb2.WorkloadReport(output_tokens=[1 << 20]), "between 1 and"),
        (scheduler_pb2.WorkloadReport(input_tokens=[5] * 9000), "limit is 8192"),
        (
            scheduler_pb2.WorkloadReport(
                stage_times=[scheduler_pb2.StageTimeObservation(batch_size=1, measured_s=1)]
            ),
            "STAGE_KIND_ENCODE, STAGE_KIND_DECODE, STAGE_KIND_TRANSFER or STAGE_KIND_OVERHEAD",
        ),
        (
            scheduler_pb2.WorkloadReport(
                stage_times=[
                    scheduler_pb2.StageTimeObservation(
                        stage=scheduler_pb2.STAGE_KIND_DECODE,
                        batch_size=2,
                        num_tokens=10,
                        num_layers=4,
                        tp_degree=16,
                        measured_s=0.01,
                    )
                ]
            ),
            "TP degree 16",
        ),
    ],
)
def test_bad_reports_are_invalid_argument(
    scheduler: RunningScheduler,
    background_loop: BackgroundLoop,
    report: scheduler_pb2.WorkloadReport,
    message: str,
) -> None:
    async def go() -> grpc.aio.AioRpcError:
        async def reports() -> AsyncIterator[scheduler_pb2.WorkloadReport]:
            yield report

        channel, client = stub(scheduler.address)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await client.ReportWorkload(reports(), timeout=TIMEOUT_S)
            return failure.value

    error = background_loop.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")


# ---- drift: a new schedule pushed to the watcher ---------------------------------------------


def test_length_drift_pushes_a_new_schedule(background_loop: BackgroundLoop) -> None:
    async def go() -> None:
        running = await start_scheduler(drift_config())
        channel, client = stub(running.address)
        try:
            watch = client.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id="r0"))
            updates = watch.__aiter__()
            initial = await next_update(updates)
            assert initial.version == 1
            # Task S lengths match the plan: no re-plan.
            ack = await client.ReportWorkload(length_reports("S", 200, seed=1))
            assert (ack.num_reports, ack.num_input_lengths, ack.num_output_lengths) == (4, 200, 200)
            await asyncio.sleep(0.2)
            assert running.core.current is not None and running.core.current.version == 1
            # Task C2 lengths: far longer outputs. The first C2 report already drifts the
            # window (a mix of S and C2), so version 2 plans for the mix and the next reports,
            # judged against the mix, move the plan on to C2 alone.
            ack = await client.ReportWorkload(length_reports("C2", 200, seed=2))
            update = await next_update(updates)
            assert update.version == 2
            assert update.reason == scheduler_pb2.REPLAN_REASON_LENGTH_DRIFT
            assert update.drift.output.drifted and update.drift.output.relative_mean_shift > 0.5
            assert update.drift.output.num_observations >= 100
            assert update.workload.startswith("observed")
            assert update.latency_bound_s == BOUND_S
            assert "output lengths" in update.detail
            while update.mean_output_tokens < 200:
                previous, update = update, await next_update(updates)
                assert update.version == previous.version + 1 <= 4
                assert update.reason == scheduler_pb2.REPLAN_REASON_LENGTH_DRIFT
            assert update.p99_output_tokens > 400
            # Every schedule is slower on a 3x decode: the best within the bound does less.
            assert update.prediction.throughput_seq_s < initial.prediction.throughput_seq_s
            watch.cancel()
        finally:
            await channel.close()
            await running.stop(0.5)

    background_loop.run(go())


def decode_stage_times(factor: float, num: int) -> list[scheduler_pb2.StageTimeObservation]:
    cost_model = analytic_cost_model("a40:opt-13b")
    messages = []
    for i in range(num):
        batch = 8 + i
        observation = StageTimeObservation(StageKind.DECODE, batch, batch * 300, 10, 1.0)
        messages.append(
            scheduler_pb2.StageTimeObservation(
                stage=scheduler_pb2.STAGE_KIND_DECODE,
                batch_size=batch,
                num_tokens=batch * 300,
                num_layers=10,
                tp_degree=1,
                measured_s=factor * predict_stage_s(cost_model, observation),
            )
        )
    return messages


def test_stage_time_drift_pushes_a_recalibrated_schedule(background_loop: BackgroundLoop) -> None:
    async def reports(factor: float, num: int) -> AsyncIterator[scheduler_pb2.WorkloadReport]:
        yield scheduler_pb2.WorkloadReport(stage_times=decode_stage_times(factor, num))

    async def go() -> None:
        running = await start_scheduler(drift_config())
        channel, client = stub(running.address)
        try:
            watch = client.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id="r0"))
            updates = watch.__aiter__()
            initial = await next_update(updates)
            ack = await client.ReportWorkload(reports(1.05, 12))  # within the threshold
            assert ack.num_stage_times == 12
            await asyncio.sleep(0.2)
            assert running.core.current is not None and running.core.current.version == 1
            # Decode steps 3x slower than profiled (the window's median moves to 3).
            await client.ReportWorkload(reports(3.0, 30))
            update = await next_update(updates)
            assert update.version == 2
            assert update.reason == scheduler_pb2.REPLAN_REASON_STAGE_TIME_DRIFT
            assert update.drift.decode_time_ratio == pytest.approx(3.0, rel=0.05)
            assert update.drift.num_decode_observations >= 10
            assert update.workload == "task:S"
            # Every schedule is slower on a 3x decode: the best within the bound does less.
            assert update.prediction.throughput_seq_s < initial.prediction.throughput_seq_s
            watch.cancel()
        finally:
            await channel.close()
            await running.stop(0.5)

    background_loop.run(go())


# ---- subscriber limit, activation, shutdown --------------------------------------------------


def test_subscriber_limit_activation_and_shutdown(background_loop: BackgroundLoop) -> None:
    async def go() -> None:
        # No profile configured: nothing is planned until a Plan call activates a schedule.
        running = await start_scheduler(drift_config(profile=None, max_subscribers=2))
        channel, client = stub(running.address)
        try:
            watches = []
            for i in range(3):
                watch = client.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id=f"r{i}"))
                await asyncio.wait_for(watch.initial_metadata(), TIMEOUT_S)  # subscribed
                watches.append(watch)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await asyncio.wait_for(watches[2].read(), TIMEOUT_S)
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 2" in (failure.value.details() or "")
            request = scheduler_pb2.PlanRequest(profile=PROFILE, activate=True)
            response = await client.Plan(request, timeout=TIMEOUT_S)
            assert response.version == 1
            for watch in watches[:2]:
                update = await asyncio.wait_for(watch.read(), TIMEOUT_S)
                assert update.version == 1
                assert update.reason == scheduler_pb2.REPLAN_REASON_REQUESTED
                assert update.schedule == response.chosen.schedule
            await running.stop(0.5)
            # Shutdown ends the watch streams cleanly instead of cutting them.
            for watch in watches[:2]:
                assert await asyncio.wait_for(watch.read(), TIMEOUT_S) is grpc.aio.EOF
                assert await watch.code() == grpc.StatusCode.OK
        finally:
            await channel.close()
            await running.stop(0.5)

    background_loop.run(go())
