"""A replica's link to the scheduler (`exegpt worker --scheduler HOST:PORT`).

Two tasks on the worker's event loop:

- **watch**: WatchSchedule (replica id = this worker's address, after_version = the version
  it runs) and hand every update to the engine with `Engine.apply_schedule`, which takes it
  at its next step boundary. The update's placement goes with it only when this replica runs
  stage processes and the placement needs as many; otherwise only the control variables
  apply (logged).
- **report**: every `report_interval_s`, drain the engine's observations and send them over
  ReportWorkload (lengths, and per-stage step times: workload_report.py). With nothing to
  report an empty report still goes, and its answer carries the scheduler's current version:
  one below the version this replica runs means the scheduler restarted (its versions start
  at 1 again), so the watch starts over from version 0.

Serving never depends on the scheduler: while it is down the engine keeps the last schedule,
the watch reconnects with a capped exponential backoff, unsent observations wait (bounded),
and nothing here blocks the engine (apply_schedule and drain_observations only swap a field).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import grpc

from exegpt.models.config import ModelConfig
from exegpt.placement import Placement
from exegpt.schedule_proto import schedule_from_proto
from exegpt.security import SecurityConfig, aio_channel
from exegpt.serving import channel_options
from exegpt.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.worker.config import ScheduleLinkConfig
from services.worker.engine import Engine
from services.worker.observations import Observations
from services.worker.schedule_board import (
    PlannedPrediction,
    ScheduleBoard,
    ScheduleOrigin,
    ScheduleSource,
)
from services.worker.workload_report import build_reports, merge

logger = logging.getLogger(__name__)

REASONS = {
    scheduler_pb2.REPLAN_REASON_INITIAL: "initial",
    scheduler_pb2.REPLAN_REASON_LENGTH_DRIFT: "length-drift",
    scheduler_pb2.REPLAN_REASON_STAGE_TIME_DRIFT: "stage-time-drift",
    scheduler_pb2.REPLAN_REASON_REQUESTED: "requested",
}


def placement_to_apply(
    offered: Placement | None, current: Placement | None
) -> tuple[Placement | None, str]:
    """The placement to hand the engine with a pushed schedule, and why none when none: an
    in-process replica has no stages to redeploy, and a placement needing another number of
    processes cannot be loaded on the ones this replica has. The stages keep their device."""
    if offered is None:
        return None, "the update carries no placement"
    if current is None:
        return None, "this replica runs the model in process"
    if offered.num_processes != current.num_processes:
        return None, (
            f"the placement needs {offered.num_processes} stage processes; "
            f"this replica has {current.num_processes}"
        )
    device = current.stages[0].device
    stages = tuple(dataclasses.replace(stage, device=device) for stage in offered.stages)
    return Placement(stages), ""


def origin_from_update(update: scheduler_pb2.ScheduleUpdate, num_replicas: int) -> ScheduleOrigin:
    """The origin of a pushed schedule on one of the deployment's `num_replicas` replicas.
    Raises ValueError for a schedule the engine cannot run."""
    prediction = update.prediction
    return ScheduleOrigin(
        source=ScheduleSource.SCHEDULER,
        version=update.version,
        reason=REASONS.get(update.reason, "unspecified"),
        prediction=PlannedPrediction(
            throughput_seq_s=prediction.throughput_seq_s,
            throughput_tokens_s=prediction.throughput_tokens_s,
            latency_s=prediction.latency_s,
            meets_bound=update.meets_bound,
            latency_bound_s=update.latency_bound_s or None,
            workload=update.workload,
        ).per_replica(num_replicas),
        schedule=schedule_from_proto(update.schedule),
        published_unix_s=update.published_unix_s,
    )


def _channel_options(config: ScheduleLinkConfig) -> list[tuple[str, Any]]:
    # gRPC's own reconnect backoff grows to 120 s; keep it within ours.
    backoff_ms = max(100, int(config.max_backoff_s * 1000))
    return [
        *channel_options(4 * 2**20),
        ("grpc.initial_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]


class ScheduleLink:
    def __init__(
        self,
        config: ScheduleLinkConfig,
        engine: Engine,
        board: ScheduleBoard,
        model: ModelConfig,
        *,
        replica_id: str,
        security: SecurityConfig | None = None,
    ) -> None:
        self.config = config
        self._engine = engine
        self._board = board
        self._model = model
        self.replica_id = replica_id
        self._channel = aio_channel(
            config.address, security or SecurityConfig(), _channel_options(config)
        )
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._watch_task: asyncio.Task[None] | None = None
        self._report_task: asyncio.Task[None] | None = None
        self._backlog = Observations()
        self._watch_from: int | None = None  # None: the version handed to the engine
        # The deployment's data-parallel replicas R (None: the first pushed schedule's).
        self.deployed_replicas = config.num_replicas
        self.num_reports_sent = 0
        board.scheduler = config.address

    def start(self) -> None:
        self._watch_task = asyncio.create_task(self._watch_forever())
        self._report_task = asyncio.create_task(self._report_forever())

    async def stop(self) -> None:
        tasks = [t for t in (self._watch_task, self._report_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._channel.close()
        self._board.scheduler_connected = False

    # ---- watch -----------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        backoff_s = self.config.initial_backoff_s
        while True:
            since = self._watch_from
            if since is None:
                since = self._board.handed_over.version
            request = scheduler_pb2.WatchScheduleRequest(
                replica_id=self.replica_id, after_version=since
            )
            call = self._stub.WatchSchedule(request)
            try:
                await call.wait_for_connection()  # the scheduler holds our slot
                self._connected(True, f"subscribed after version {since}")
                backoff_s = self.config.initial_backoff_s
                async for update in call:
                    self._watch_from = None
                    self.apply(update)
                why = "the scheduler ended the stream"
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
            self._connected(False, f"{why}; retrying in {backoff_s:.2f} s")
            await asyncio.sleep(backoff_s)
            backoff_s = min(self.config.max_backoff_s, backoff_s * 2)

    def _connected(self, connected: bool, detail: str) -> None:
        if connected != self._board.scheduler_connected:
            log = logger.info if connected else logger.warning
            log(
                "scheduler %s %s: %s",
                self.config.address,
                "connected" if connected else "unreachable",
                detail,
            )
        self._board.scheduler_connected = connected

    def apply(self, update: scheduler_pb2.ScheduleUpdate) -> None:
        """Hand a pushed schedule to the engine (at its next step boundary), unless it plans
        another number of replicas than this deployment runs (its control variables are
        sized for that many: skipped, logged)."""
        replicas = update.schedule.num_replicas or 1  # 0: a sender without the field
        deployed = self.deployed_replicas or replicas
        if replicas != deployed:
            logger.error(
                "schedule v%d plans %d replicas, this deployment runs %d; skipped, keeping ours",
                update.version,
                replicas,
                deployed,
            )
            return
        try:
            origin = origin_from_update(update, deployed)
        except ValueError as exc:
            logger.error("schedule v%d cannot run here (%s); keeping ours", update.version, exc)
            return
        self.deployed_replicas = deployed
        offered = None
        if update.placement_json:
            try:
                offered = Placement.from_json(update.placement_json)
            except ValueError as exc:
                logger.warning("schedule v%d: unreadable placement: %s", update.version, exc)
        placement, why_not = placement_to_apply(offered, self._engine.placement)
        assert origin.schedule is not None
        self._engine.apply_schedule(origin.schedule, placement, update.mean_input_tokens or None)
        self._board.offer(origin)
        logger.info(
            "schedule v%d (%s) handed to the engine: %s%s",
            origin.version,
            origin.reason,
            origin.schedule.describe(),
            " with its placement" if placement else f"; control variables only ({why_not})",
        )

    def _resubscribe_from_start(self) -> None:
        self._watch_from = 0
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.create_task(self._watch_forever())

    # ---- report ----------------------------------------------------------------------------

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            await self.report_once()

    async def report_once(self) -> int | None:
        """Send what was observed since the last report; the scheduler's current version, or
        None when it could not be reached (the observations wait for the next report)."""
        observations = merge(self._backlog, self._engine.drain_observations())
        self._backlog = Observations()
        reached, current = await self._send(observations, with_stage_times=True)
        if not reached:
            self._backlog = observations
            return None
        if current is None:
            return None
        handed_over = self._board.handed_over
        if handed_over.source is ScheduleSource.SCHEDULER and current < handed_over.version:
            logger.warning(
                "the scheduler is at version %d but this replica runs v%d: it restarted; "
                "watching from its first version",
                current,
                handed_over.version,
            )
            self._resubscribe_from_start()
        return current

    async def _send(
        self, observations: Observations, *, with_stage_times: bool
    ) -> tuple[bool, int | None]:
        """(whether the scheduler was reached, its current version unless it refused)."""
        reports = build_reports(
            observations,
            self._engine.placement,
            self._model,
            replica_id=self.replica_id,
            max_items=self.config.max_report_items,
            with_stage_times=with_stage_times,
        )
        try:
            response = await self._stub.ReportWorkload(
                iter(reports), timeout=self.config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT and with_stage_times:
                # e.g. a TP degree its profile lacks: the lengths still count for drift.
                logger.warning("the scheduler refused our stage times (%s)", exc.details())
                return await self._send(observations, with_stage_times=False)
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                logger.error("the scheduler refused a report (%s); dropped", exc.details())
                return True, None
            logger.debug("report not sent: %s", exc.code().name)
            return False, None
        self.num_reports_sent += len(reports)
        return True, response.current_version


async def start_schedule_link(
    config: ScheduleLinkConfig,
    engine: Engine,
    board: ScheduleBoard,
    model: ModelConfig,
    *,
    replica_id: str,
    security: SecurityConfig | None = None,
) -> ScheduleLink:
    link = ScheduleLink(config, engine, board, model, replica_id=replica_id, security=security)
    link.start()
    logger.info(
        "watching the schedule of %s as %s; reporting every %.1f s",
        config.address,
        replica_id,
        config.report_interval_s,
    )
    return link
