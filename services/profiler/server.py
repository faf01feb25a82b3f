"""The profiler's gRPC surface: StartProfile, GetProfile and ListProfiles over ProfilerCore.

Handlers only translate: protobuf to dataclasses (convert.py), core errors to status codes
(INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED when the device's queue is full,
NOT_FOUND for an unknown profile, UNAVAILABLE while shutting down).
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
from exegpt.v1 import profiler_pb2, profiler_pb2_grpc
from services.profiler import convert
from services.profiler.config import ProfilerConfig
from services.profiler.service import Done, ProfilerCore, Runner, default_runner

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.profiler")


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    def __init__(self, core: ProfilerCore) -> None:
        self._core = core

    async def StartProfile(  # noqa: N802 (gRPC method name)
        self, request: profiler_pb2.StartProfileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[profiler_pb2.ProfileEvent]:
        metadata = context.invocation_metadata()
        with tracing.server_span(tracer, "profiler.start_profile", metadata) as span:
            try:
                profile_request = convert.request_from_proto(request)
                span.set_attribute("exegpt.profile.model", profile_request.model)
                span.set_attribute("exegpt.profile.device", profile_request.device)
                span.set_attribute("exegpt.profile.grid", profile_request.grid_name)
                async for event in self._core.profile(profile_request):
                    if isinstance(event, Done):
                        span.set_attribute("exegpt.profile.id", event.summary.profile_id)
                    yield convert.event_to_proto(event)
            except RequestError as exc:
                await context.abort(to_grpc_status(exc.code), exc.message)

    async def GetProfile(  # noqa: N802
        self, request: profiler_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> profiler_pb2.GetProfileResponse:
        try:
            summary, text = await self._core.get(request.profile_id)
        except RequestError as exc:
            await context.abort(to_grpc_status(exc.code), exc.message)
        return profiler_pb2.GetProfileResponse(
            summary=convert.summary_to_proto(summary), profile_json=text
        )

    async def ListProfiles(  # noqa: N802
        self, request: profiler_pb2.ListProfilesRequest, context: grpc.aio.ServicerContext
    ) -> profiler_pb2.ListProfilesResponse:
        summaries, num_invalid = await self._core.list(request.model, request.device, request.limit)
        return profiler_pb2.ListProfilesResponse(
            profiles=[convert.summary_to_proto(s) for s in summaries], num_invalid=num_invalid
        )


RunningProfiler = RunningService[ProfilerCore]


async def start_profiler(
    config: ProfilerConfig, *, runner: Runner = default_runner
) -> RunningProfiler:
    core = ProfilerCore(config, runner=runner)
    servicer = ProfilerServicer(core)
    grpc_server = await start_grpc_server(
        lambda server: profiler_pb2_grpc.add_ProfilerServicer_to_server(servicer, server),
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        security=config.security,
    )
    logger.info("profiler serving on %s, profiles in %s", grpc_server.address, core.store.directory)
    return RunningService(grpc_server, core)
