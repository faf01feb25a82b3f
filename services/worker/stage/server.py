"""The stage's gRPC control surface: describe, load a layer range, stats, stop."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc

from exegpt.compute_threads import in_passing_thread
from exegpt.v1 import stage_pb2, stage_pb2_grpc
from services.worker.stage.runtime import LoadError, StageRuntime

logger = logging.getLogger(__name__)


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, runtime: StageRuntime, host: str, stop: asyncio.Event) -> None:
        self._runtime = runtime
        self._host = host
        self._stop = stop
        self._load_lock = asyncio.Lock()

    def _info(self) -> stage_pb2.StageInfo:
        info = stage_pb2.StageInfo(
            data_address=self._runtime.data_address, free_port=_free_port(self._host)
        )
        loaded = self._runtime.loaded
        if loaded is not None:
            request = loaded.request
            info.loaded = True
            info.model = request.model
            info.encoder_start, info.encoder_stop = request.encoder_start, request.encoder_stop
            info.decoder_start, info.decoder_stop = request.decoder_start, request.decoder_stop
            info.tp_rank, info.tp_degree = request.tp_rank, request.tp_degree
            info.load_id = request.load_id
        return info

    async def Describe(  # noqa: N802 (gRPC method name)
        self, request: stage_pb2.DescribeStageRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageInfo:
        return self._info()

    async def Load(  # noqa: N802
        self, request: stage_pb2.LoadStageRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageInfo:
        async with self._load_lock:
            try:
                # On a thread that ends with the load, so that its OpenMP team goes with it
                # and the stage loop's stays the only one (exegpt/compute_threads.py).
                runtime = self._runtime
                await in_passing_thread(
                    lambda: runtime.load(request), runtime.torch_threads, "stage-load"
                )
            except LoadError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except (OSError, RuntimeError, ValueError) as exc:
                logger.exception("load failed")
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"load failed: {exc}")
        return self._info()

    async def GetStats(  # noqa: N802
        self, request: stage_pb2.GetStageStatsRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageStats:
        counters = self._runtime.counters
        loaded = self._runtime.loaded
        with counters.lock:
            stats = stage_pb2.StageStats(
                num_steps=counters.num_steps,
                num_errors=counters.num_errors,
                num_bad_frames=counters.num_bad_frames,
                compute_s=counters.compute_s,
            )
        if loaded is not None and loaded.pool is not None:
            stats.kv_capacity_bytes = loaded.pool.capacity_bytes
        return stats

    async def Stop(  # noqa: N802
        self, request: stage_pb2.StopStageRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StopStageResponse:
        logger.info("stop requested over gRPC")
        self._stop.set()
        return stage_pb2.StopStageResponse()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
