"""A replica's schedule link and the deployment's data-parallel replicas R: a pushed schedule
of R replicas predicts R replicas' throughput, so each replica expects 1/R of it; one planned
for another R is skipped, never run with control variables sized for another deployment."""

from __future__ import annotations

import asyncio
import logging

import pytest

from exegpt.models.loader import LoadedModel, load_model
from exegpt.schedule import Schedule, ScheduleKind
from exegpt.schedule_proto import schedule_to_proto
from exegpt.v1 import scheduler_pb2
from services.worker.config import EngineConfig, ScheduleLinkConfig
from services.worker.schedule_board import ScheduleBoard, ScheduleSource, initial_origin
from services.worker.schedule_link import ScheduleLink
from services.worker.server import build_engine


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model("exegpt-tiny-t5")


def _update(version: int, num_replicas: int, batch: int) -> scheduler_pb2.ScheduleUpdate:
    schedule = Schedule(
        ScheduleKind.RRA, batch, 2 * batch, num_decode_iterations=3, num_replicas=num_replicas
    )
    return scheduler_pb2.ScheduleUpdate(
        version=version,
        reason=scheduler_pb2.REPLAN_REASON_LENGTH_DRIFT,
        schedule=schedule_to_proto(schedule),
        prediction=scheduler_pb2.Prediction(
            throughput_seq_s=12.0, throughput_tokens_s=600.0, latency_s=0.5
        ),
        meets_bound=True,
    )


def _apply_all(
    loaded: LoadedModel, deployed: int | None, updates: list[scheduler_pb2.ScheduleUpdate]
) -> ScheduleBoard:
    """Hand `updates` to a real engine's link, in order; the board after them."""
    engine = build_engine(loaded, EngineConfig(max_batch_size=8))
    board = ScheduleBoard(engine, initial_origin(None, None))

    async def run() -> None:
        config = ScheduleLinkConfig("127.0.0.1:1", num_replicas=deployed)  # never dialled
        link = ScheduleLink(config, engine, board, loaded.config, replica_id="r0")
        try:
            for update in updates:
                link.apply(update)
        finally:
            await link.stop()

    asyncio.run(run())
    return board


def test_each_replica_expects_its_share_of_the_deployed_r(loaded: LoadedModel) -> None:
    board = _apply_all(loaded, 3, [_update(1, 3, batch=4)])
    handed = board.handed_over
    assert handed.source is ScheduleSource.SCHEDULER and handed.version == 1
    assert handed.prediction is not None
    assert handed.prediction.throughput_seq_s == pytest.approx(4.0)
    assert handed.prediction.throughput_tokens_s == pytest.approx(200.0)
    assert handed.prediction.latency_s == 0.5


def test_a_pushed_schedule_of_another_r_is_skipped(
    loaded: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="services.worker.schedule_link"):
        board = _apply_all(loaded, 2, [_update(1, 2, batch=4), _update(2, 4, batch=9)])
    handed = board.handed_over
    assert handed.version == 1 and handed.schedule is not None
    assert handed.schedule.encode_batch_size == 4 and handed.schedule.num_replicas == 2
    assert "schedule v2 plans 4 replicas, this deployment runs 2; skipped" in caplog.text


def test_without_a_deployed_r_the_first_pushed_schedule_sets_it(loaded: LoadedModel) -> None:
    board = _apply_all(
        loaded, None, [_update(1, 2, batch=4), _update(2, 1, batch=6), _update(3, 2, batch=7)]
    )
    handed = board.handed_over
    assert handed.version == 3 and handed.schedule is not None  # v2 (R = 1) was skipped
    assert handed.schedule.encode_batch_size == 7
    assert handed.prediction is not None and handed.prediction.throughput_seq_s == 6.0
