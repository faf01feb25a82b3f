"""The scheduler's gRPC surface: Plan, WatchSchedule and ReportWorkload over SchedulerCore.

Handlers only translate: protobuf to dataclasses (convert.py), core errors to status codes
(RequestError's code: INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED for too many
watchers, UNAVAILABLE while shutting down).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from exegpt import tracing
from exegpt.errors import RequestError
from exegpt.grpc_errors import to_grpc_status
from exegpt.serving import RunningService, start_grpc_server
from exegpt.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler import convert
from services.scheduler.config import SchedulerConfig
from services.scheduler.queries import CostModelLoader
from services.scheduler.service import Planner, SchedulerCore, default_planner

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.scheduler")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, core: SchedulerCore) -> None:
        self._core = core

    async def Plan(  # noqa: N802 (gRPC method name)
        self, request: scheduler_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.PlanResponse:
        metadata = context.invocation_metadata()
        with tracing.server_span(tracer, "scheduler.plan", metadata) as span:
            try:
                outcome = await self._core.plan(convert.query_from_proto(request))
            except RequestError as exc:
                await context.abort(to_grpc_status(exc.code), exc.message)
            span.set_attribute("exegpt.plan.evaluations", outcome.result.search.num_evaluations)
            return convert.outcome_to_proto(outcome)

    async def WatchSchedule(  # noqa: N802
        self, request: scheduler_pb2.WatchScheduleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.ScheduleUpdate]:
        try:
            subscription = self._core.subscribe(
                request.replica_id, request.after_version, client=peer_host(context.peer())
            )
        except RequestError as exc:
            await context.abort(to_grpc_status(exc.code), exc.message)
        with subscription:
            await context.send_initial_metadata(())  # tells the replica it is subscribed
            async for published in subscription:
                yield convert.update_to_proto(published)

    async def ReportWorkload(  # noqa: N802
        self,
        request_iterator: AsyncIterator[scheduler_pb2.WorkloadReport],
        context: grpc.aio.ServicerContext,
    ) -> scheduler_pb2.ReportWorkloadResponse:
        response = scheduler_pb2.ReportWorkloadResponse()
        max_items = self._core.config.max_report_items
        async for report in request_iterator:
            try:
                ack = self._core.report(
                    convert.observations_from_proto(report, max_items=max_items)
                )
            except RequestError as exc:
                await context.abort(to_grpc_status(exc.code), exc.message)
            response.num_reports += 1
            response.num_input_lengths += ack.num_input_lengths
            response.num_output_lengths += ack.num_output_lengths
            response.num_stage_times += ack.num_stage_times
        current = self._core.current
        response.current_version = current.version if current else 0
        return response


def peer_host(peer: str) -> str:
    """The host of a gRPC peer ("ipv4:10.0.0.2:5123", "ipv6:[::1]:5123"): one client."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rsplit(":", 1)[0].strip("[]")
    return peer  # unix sockets and the like: the whole peer string


RunningScheduler = RunningService[SchedulerCore]


async def start_scheduler(
    config: SchedulerConfig,
    *,
    planner: Planner = default_planner,
    cost_model_loader: CostModelLoader | None = None,
) -> RunningScheduler:
    """Plan the configured problem (if a profile is set), then serve."""
    core = SchedulerCore(config, planner=planner, cost_model_loader=cost_model_loader)
    await core.start()
    servicer = SchedulerServicer(core)
    grpc_server = await start_grpc_server(
        lambda server: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server),
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        security=config.security,
    )
    current = core.current
    logger.info(
        "scheduler serving on %s (%s)",
        grpc_server.address,
        f"schedule v{current.version}: {current.prediction.schedule.describe()}"
        if current
        else "no schedule until a Plan call activates one",
    )
    return RunningService(grpc_server, core)
