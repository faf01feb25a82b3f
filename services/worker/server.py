"""The worker's gRPC surface: Worker.Generate streams tokens from the engine.

Handlers convert protobuf to the dataclasses of exegpt.generation, hand requests to the
engine, and turn engine events back into chunks. Cancelling the call aborts the request,
so a client that disconnects frees its KV cache at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from exegpt import tracing
from exegpt.chat import ChatTemplate
from exegpt.compute_threads import in_passing_thread
from exegpt.dtypes import dtype_name
from exegpt.generation import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    chunk_to_proto,
    request_from_proto,
)
from exegpt.models import paged_decode
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec
from exegpt.models.loader import LoadedModel, ModelCard
from exegpt.models.prepack import linear_kernel, pack_linears
from exegpt.serving import ROUTER_ID_METADATA, GrpcServer, start_grpc_server
from exegpt.stops import StopMatcher
from exegpt.v1 import generate_pb2, metrics_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.worker.config import EngineConfig, WorkerConfig
from services.worker.detokenizer import IncrementalDetokenizer
from services.worker.engine import (
    Engine,
    EngineEvent,
    EngineRequest,
    EngineStoppedError,
    QueueFullError,
    RequestTimings,
)
from services.worker.executor.local import LocalExecutor
from services.worker.executor.pipeline import PipelineExecutor
from services.worker.executor.pipeline_config import PipelineConfig
from services.worker.load_watch import LoadBoard, TooManyWatchersError
from services.worker.metrics import (
    MetricsServicer,
    metrics_of,
    start_metrics_port,
    stop_metrics_port,
)
from services.worker.schedule_board import ScheduleBoard, initial_origin
from services.worker.token_text import named_logprobs, text_token_ids

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.worker")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self, loaded: LoadedModel | ModelCard, engine: Engine, board: ScheduleBoard | None = None
    ) -> None:
        self._loaded = loaded
        self._engine = engine
        self.metrics = metrics_of(engine, loaded.name)
        self._board = board or ScheduleBoard(engine, initial_origin(engine.config.schedule, None))
        self.loads = LoadBoard(engine)

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateChunk]:
        metadata = context.invocation_metadata()
        with tracing.server_span(tracer, "worker.generate", metadata) as span:
            try:
                generation = request_from_proto(request)
                generation.validate()
                prompt_ids = self._prompt_token_ids(generation)
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if generation.model and generation.model != self._loaded.name:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"model {generation.model!r} is not served here"
                )
            # The engine's key is ours alone: a client's request_id is only a label echoed
            # back, so another client reusing it can never find or abort this request.
            engine_key = uuid.uuid4().hex
            label = generation.request_id or engine_key
            span.set_attribute("exegpt.request_id", label)
            span.set_attribute("exegpt.engine_key", engine_key)
            span.set_attribute("exegpt.prompt_tokens", len(prompt_ids))
            router_id = dict(metadata or ()).get(ROUTER_ID_METADATA, "")
            run = self._run(context, engine_key, label, generation, prompt_ids, router_id)
            async for chunk in run:
                yield chunk_to_proto(chunk)

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        engine_key: str,
        label: str,
        generation: GenerationRequest,
        prompt_ids: list[int],
        router_id: str,
    ) -> AsyncIterator[GenerationChunk]:
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        started_s = time.monotonic()
        loop = asyncio.get_running_loop()
        engine_request = EngineRequest(
            request_id=engine_key,
            prompt_token_ids=prompt_ids,
            sampling=generation.sampling,
            on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            trace_context=trace.get_current_span().get_span_context(),
        )
        try:
            self._engine.submit(engine_request)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        self.loads.accepted(router_id)
        detokenizer = IncrementalDetokenizer(self._loaded.tokenizer)
        stops = StopMatcher(generation.sampling.stop)
        num_generated = 0
        queue_s = 0.0
        finished = False
        token_times: list[float] = []
        timings: RequestTimings | None = None
        try:
            while not finished:
                batch = await _next_events(events)
                chunk = GenerationChunk(request_id=label, token_ids=[])
                for event in batch:
                    if event.error is not None:
                        # This request failed, not the replica: INTERNAL keeps the router
                        # from marking the replica down and retrying (spreading) the request.
                        # UNAVAILABLE only when the replica itself broke (a stage died).
                        finished = True
                        code = grpc.StatusCode.INTERNAL
                        if event.unavailable:
                            code = grpc.StatusCode.UNAVAILABLE
                        await context.abort(code, event.error)
                    chunk.token_ids += event.token_ids
                    chunk.token_times_s += event.token_times_s
                    chunk.logprobs += event.logprobs
                    queue_s = event.queue_s or queue_s  # token events carry it
                    if event.finish_reason is not None:
                        finished = True
                        chunk.finish_reason = event.finish_reason
                        _record_phase_spans(event.timings)
                        timings = event.timings
                self.metrics.on_tokens(len(prompt_ids), chunk.token_times_s, not token_times)
                token_times += chunk.token_times_s
                if chunk.finish_reason is not None:
                    self.metrics.on_finish(chunk.finish_reason, token_times, timings)
                num_generated += len(chunk.token_ids)
                text_ids = text_token_ids(chunk, generation.sampling)
                chunk.text = detokenizer.add(text_ids, final=finished)
                chunk.logprobs = named_logprobs(self._loaded.tokenizer, chunk.logprobs)
                if generation.sampling.stop:
                    chunk.text = stops.feed(chunk.text, final=finished)
                    if stops.stopped:  # the text reached a stop string: end here
                        if not finished:
                            self._engine.abort(engine_key)
                            self.metrics.on_finish(FinishReason.STOP, token_times, None)
                        finished = True
                        chunk.finish_reason = FinishReason.STOP
                if finished:
                    chunk.prompt_tokens = len(prompt_ids)
                    chunk.completion_tokens = num_generated
                    chunk.queue_s = queue_s
                    chunk.generation_s = time.monotonic() - started_s - queue_s
                    self._board.record_finish(num_generated, chunk.generation_s)
                yield chunk
        finally:
            if not finished:
                logger.info("request %s (%s) cancelled by its client; aborting", label, engine_key)
                self._engine.abort(engine_key)

    def _prompt_token_ids(self, generation: GenerationRequest) -> list[int]:
        if generation.prompt_token_ids is not None:
            return list(generation.prompt_token_ids)
        tokenizer = self._loaded.tokenizer
        if tokenizer is None:
            raise InvalidRequestError(
                f"model {self._loaded.name!r} has no tokenizer; send the prompt as token ids"
            )
        token_ids = tokenizer.encode(generation.prompt_text or "")
        if not token_ids:
            raise InvalidRequestError("prompt encodes to no tokens")
        return token_ids

    async def GetStats(  # noqa: N802
        self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStats:
        stats = self._engine.stats()
        fields = {
            **stats.__dict__,
            "step_totals": [t.__dict__ for t in stats.step_totals],
            "step_totals_by_rows": [t.__dict__ for t in stats.step_totals_by_rows],
            "head_waits": dict(stats.head_waits),
        }
        del fields["decode_ahead"]  # scraped as exegpt:decode_ahead_steps, not in WorkerStats
        return worker_pb2.WorkerStats(**fields)

    async def WatchLoad(  # noqa: N802
        self, request: worker_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.LoadUpdate]:
        try:
            async for update in self.loads.watch(request.router_id):
                yield update
        except TooManyWatchersError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def GetSchedule(  # noqa: N802
        self, request: worker_pb2.GetScheduleRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ScheduleStatus:
        return self._board.status()

    async def GetModelInfo(  # noqa: N802
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.ModelInfo:
        config = self._loaded.config
        return generate_pb2.ModelInfo(
            name=self._loaded.name,
            family=config.family,
            vocab_size=config.vocab_size,
            max_context_tokens=config.max_context_tokens,
            has_tokenizer=self._loaded.tokenizer is not None,
            **_chat_fields(self._loaded.chat_template),
        )


def _chat_fields(template: ChatTemplate | None) -> dict[str, str]:
    if template is None:
        return {}
    return {
        "chat_template": template.source,
        "bos_token": template.bos_token,
        "eos_token": template.eos_token,
    }


async def _next_events(events: asyncio.Queue[EngineEvent]) -> list[EngineEvent]:
    """Wait for one event, then take whatever else is ready (coalesces slow readers)."""
    batch = [await events.get()]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


def _record_phase_spans(timings: RequestTimings | None) -> None:
    """Child spans of the current request span for its queue wait, prefill and decode."""
    if timings is None:
        return
    phases = (
        ("worker.queue_wait", timings.arrival_ns, timings.admitted_ns),
        ("worker.prefill", timings.admitted_ns, timings.prefill_end_ns),
        ("worker.decode", timings.prefill_end_ns, timings.finished_ns),
    )
    for name, start_ns, end_ns in phases:
        span = tracer.start_span(name, start_time=start_ns)
        if name == "worker.prefill":
            span.set_attribute("exegpt.batch_size", timings.prefill_batch_size)
        span.end(end_time=max(start_ns, end_ns))


@dataclass
class RunningWorker:
    """A started worker: its gRPC server and engine, stopped together."""

    grpc_server: GrpcServer
    engine: Engine
    loaded: LoadedModel | ModelCard
    health_task: asyncio.Task[None] | None = None
    board: ScheduleBoard | None = None
    loads: LoadBoard | None = None

    @property
    def address(self) -> str:
        return self.grpc_server.address

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.health_task is not None:
            self.health_task.cancel()
        await self.grpc_server.set_serving(False)
        if self.loads is not None:
            self.loads.close()  # the watch streams end now, not at the grace period
        # Let in-flight streams finish within the grace period, then stop the engine.
        await self.grpc_server.server.stop(grace_s)
        await stop_metrics_port(self.engine)
        await asyncio.to_thread(self.engine.stop)


def build_engine(loaded: LoadedModel, config: EngineConfig) -> Engine:
    """An engine over the whole model in this process (its bf16 CPU Linears packed once)."""
    if packed := pack_linears(loaded.model):
        logger.info("%d Linears run %s", packed, linear_kernel(loaded.dtype, loaded.device))
    if paged_decode.prepare(loaded.dtype, loaded.device):
        logger.info("decode attention reads the KV pool in place (native kernel)")
    spec = KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype)
    pool = KVCachePool.for_memory(
        spec, config.kv_capacity_bytes, block_size_tokens=config.kv_block_size_tokens
    )
    return Engine(
        LocalExecutor(loaded.model, pool),
        config,
        model_config=loaded.config,
        num_blocks=pool.num_blocks,
        bytes_per_block=pool.bytes_per_block,
    )


async def start_worker(
    config: WorkerConfig,
    loaded: LoadedModel | ModelCard,
    engine: Engine | None = None,
    torch_threads: int | None = None,
) -> RunningWorker:
    """Serve `engine` (default: one over `loaded` in this process, built on a passing thread
    and run with `torch_threads`: exegpt/compute_threads.py) over gRPC."""
    if engine is None:
        assert isinstance(loaded, LoadedModel), "an in-process engine needs the weights"
        model = loaded
        engine = await in_passing_thread(
            lambda: build_engine(model, config.engine), torch_threads, "build-engine"
        )
    engine.start(torch_threads)
    metrics_port = await start_metrics_port(
        config.metrics_host, config.metrics_port, config.security, metrics_of(engine, loaded.name)
    )
    if metrics_port is not None:
        logger.info("worker metrics on %s:%d/metrics", config.metrics_host, metrics_port)
    board = ScheduleBoard(engine, initial_origin(config.engine.schedule, config.planned))
    servicer = WorkerServicer(loaded, engine, board)
    grpc_server = await start_grpc_server(
        lambda server: _register(server, servicer),
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        security=config.security,
        max_pending_calls=pending_calls_for(config.engine),
    )
    logger.info(
        "worker serving %s on %s (%s, %s batching, KV %.1f MiB)",
        loaded.name,
        grpc_server.address,
        dtype_name(loaded.dtype),
        config.engine.batching,
        engine.stats().kv_capacity_bytes / 2**20,
    )
    health_task = asyncio.create_task(_mirror_health(grpc_server, engine))
    return RunningWorker(grpc_server, engine, loaded, health_task, board, servicer.loads)


def pending_calls_for(engine: EngineConfig) -> int:
    """Calls a burst may open at once and all reach the handlers: four times what the
    engine's queue and running batch hold (calls past the queue are refused by the handler
    with RESOURCE_EXHAUSTED, once picked up; health checks and load watches wait there too)."""
    return 4 * (engine.max_queue_size + engine.max_batch_size)


def _register(server: grpc.aio.Server, servicer: WorkerServicer) -> None:
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    metrics_pb2_grpc.add_MetricsServicer_to_server(MetricsServicer(servicer.metrics), server)


async def _mirror_health(grpc_server: GrpcServer, engine: Engine, interval_s: float = 0.25) -> None:
    """NOT_SERVING while the engine cannot serve (a stage is down), so routers look elsewhere."""
    serving = True
    while True:
        await asyncio.sleep(interval_s)
        healthy = engine.healthy()
        if healthy != serving:
            logger.warning("replica is %s", "serving again" if healthy else "NOT serving")
            await grpc_server.set_serving(healthy)
            serving = healthy


def build_pipeline_engine(
    loaded: LoadedModel | ModelCard, config: EngineConfig, pipeline: PipelineConfig
) -> Engine:
    """An engine whose steps run over stage processes (loaded here; raises PipelineError)."""
    # The stages hold their KV in pipeline.dtype: the engine's byte accounting must use the
    # same, so a card of another dtype is a caller's mistake, refused before any stage loads.
    if pipeline.dtype != dtype_name(loaded.dtype):
        raise ValueError(
            f"the pipeline runs {pipeline.dtype} but the model card says {loaded.dtype}"
        )
    executor = PipelineExecutor(pipeline, loaded.config)
    executor.start()
    return Engine(
        executor,
        config,
        model_config=loaded.config,
        num_blocks=pipeline.num_blocks,
        bytes_per_block=KVCacheSpec.for_model(loaded.config, loaded.dtype).bytes_per_block(
            pipeline.block_size_tokens
        ),
    )
