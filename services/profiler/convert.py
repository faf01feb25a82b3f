"""Protobuf messages <-> the profiler's dataclasses, at the handler boundary."""

from __future__ import annotations

from typing import Any

from exegpt.dtypes import DEFAULT_DTYPE
from exegpt.errors import ErrorCode, RequestError
from exegpt.models.defaults import DEFAULT_MODEL_NAME
from exegpt.v1 import profiler_pb2
from services.profiler.measure.grid import AXES, build_grid
from services.profiler.measure.run import ProfileRequest, ProgressEvent
from services.profiler.service import Done, Event, Queued
from services.profiler.store import ProfileSummary


def request_from_proto(message: profiler_pb2.StartProfileRequest) -> ProfileRequest:
    """INVALID_ARGUMENT for a grid that is empty or malformed; the rest is checked later."""
    grid_name, grid = "quick", None
    if message.HasField("grid"):
        spec = message.grid
        overrides: dict[str, Any] = {
            axis: tuple(getattr(spec, axis)) for axis in AXES if len(getattr(spec, axis))
        }
        for name in ("num_warmup", "num_repeats", "num_rounds", "min_sample_s"):
            if spec.HasField(name):
                overrides[name] = getattr(spec, name)
        try:
            grid_name, grid = build_grid(spec.preset or None, overrides)
        except ValueError as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    return ProfileRequest(
        model=message.model or DEFAULT_MODEL_NAME,
        device=message.device or "cpu",
        dtype=message.dtype or DEFAULT_DTYPE,
        grid_name=grid_name,
        grid=grid,
        tp_degrees=tuple(message.tp_degrees) or None,
    )


def summary_to_proto(summary: ProfileSummary) -> profiler_pb2.ProfileSummary:
    return profiler_pb2.ProfileSummary(
        profile_id=summary.profile_id,
        model_name=summary.model_name,
        model_family=summary.model_family,
        config_hash=summary.config_hash,
        device=summary.device,
        device_name=summary.device_name,
        dtype=summary.dtype,
        grid_name=summary.grid_name,
        tp_degrees=list(summary.tp_degrees),
        created_at=summary.created_at,
        profiling_time_s=summary.profiling_time_s,
        torch_threads=summary.torch_threads,
        size_bytes=summary.size_bytes,
    )


def event_to_proto(event: Event) -> profiler_pb2.ProfileEvent:
    if isinstance(event, Queued):
        queued = profiler_pb2.ProfileQueued(position=event.position, device=event.device)
        return profiler_pb2.ProfileEvent(queued=queued)
    if isinstance(event, ProgressEvent):
        progress = profiler_pb2.ProfileProgress(
            stage=event.stage,
            num_done=event.num_done,
            num_total=event.num_total,
            elapsed_s=event.elapsed_s,
        )
        return profiler_pb2.ProfileEvent(progress=progress)
    assert isinstance(event, Done)
    done = profiler_pb2.ProfileDone(
        profile_id=event.summary.profile_id, summary=summary_to_proto(event.summary)
    )
    return profiler_pb2.ProfileEvent(done=done)
