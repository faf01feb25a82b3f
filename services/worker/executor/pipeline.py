"""PipelineExecutor: runs plans over stage processes (ZeroMQ data, gRPC control).

At start it asks every stage rank where it receives data (Describe), then loads each with
its layer range, TP rank and next hops (Load): a step enters at the first stage of its pass,
flows stage to stage, and the stage that ends the decoder sends the sampled tokens back
here. Up to one step per stage is in flight, so the stages compute at once.

A watchdog asks every rank for a sign of life; a rank that stops answering, or comes back
empty (restarted), takes the replica out of service at once: the steps in flight fail as
unavailable, and once every rank answers again the whole placement is loaded afresh under a
new load id. Messages are stamped with that id, so a stage drops steps of an earlier load.
The watchdog judges the ranks under the load lock, so a stage caught mid-way through a
redeploy's load is never mistaken for a restarted one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import torch
import zmq
from opentelemetry import propagate, trace

from exegpt.models.batch import BatchBuilder
from exegpt.models.config import ModelConfig
from exegpt.placement import Placement
from exegpt.security import sync_channel
from exegpt.transport import FrameError, PushFanout, TensorMessage, TensorSocket
from exegpt.v1 import stage_pb2, stage_pb2_grpc
from services.worker.executor.ahead import DecodeAhead
from services.worker.executor.pipeline_config import PipelineConfig, PipelineError
from services.worker.executor.results import result_from_message
from services.worker.executor.routes import first_hops, next_hops
from services.worker.step_plan import StepKind, StepPlan, StepResult

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.pipeline")


class PipelineExecutor:
    def __init__(self, config: PipelineConfig, model_config: ModelConfig) -> None:
        placement = config.placement
        placement.check(model_config)
        if len(config.stage_addresses) != len(placement.stages) or any(
            len(ranks) != stage.tp_degree
            for ranks, stage in zip(config.stage_addresses, placement.stages, strict=False)
        ):
            raise ValueError("give one address per TP rank of every stage of the placement")
        self._config = config
        self._model_config = model_config
        self.max_in_flight = len(placement.stages)
        null_slot = config.num_blocks * config.block_size_tokens
        builder = BatchBuilder(model_config, config.block_size_tokens, null_slot, _CPU)
        # A decode step's successor is built while it runs (one kept per micro-batch, however
        # many micro-batches the schedule runs over the stages).
        self._ahead = DecodeAhead(builder)
        self._context = zmq.Context()
        self._results = TensorSocket(self._context, zmq.PULL, same_host=True)
        self.data_address = self._results.bind(f"tcp://{config.data_host}:0")
        self._fanout = PushFanout(self._context)
        self._channels = [
            [sync_channel(address, config.security) for address in ranks]
            for ranks in config.stage_addresses
        ]
        self._stubs = [[stage_pb2_grpc.StageStub(c) for c in ranks] for ranks in self._channels]
        self._lock = threading.Lock()
        self._load_lock = threading.RLock()  # a redeploy and the watchdog's reload
        self._in_flight: dict[int, tuple[StepPlan, float]] = {}
        self._spans: dict[int, trace.Span] = {}
        self._failed: list[StepResult] = []
        self._healthy = False
        self._load_id = ""
        self._first_hops: dict[str, list[str]] = {}
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="pipeline-watch", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Load every stage (raises PipelineError) and start watching them."""
        try:
            self._load_all()
        except grpc.RpcError as exc:
            raise PipelineError(f"a stage is unreachable: {exc.code()} {exc.details()}") from None
        self._watchdog.start()

    def close(self) -> None:
        self._closing.set()
        if self._watchdog.is_alive():
            self._watchdog.join(5)
        self._fanout.close()
        self._results.close()
        for ranks in self._channels:
            for channel in ranks:
                channel.close()

    def healthy(self) -> bool:
        return self._healthy

    @property
    def placement(self) -> Placement:
        return self._config.placement

    def redeploy(self, placement: Placement) -> None:
        """Load `placement` on the same stage processes, regrouped by its TP degrees. No step
        may be in flight: the caller recomputes its sequences' KV afterwards."""
        placement.check(self._model_config)
        flat = [address for ranks in self._config.stage_addresses for address in ranks]
        stubs = [stub for ranks in self._stubs for stub in ranks]
        if placement.num_processes != len(flat):
            raise ValueError(
                f"the placement needs {placement.num_processes} processes; "
                f"this replica has {len(flat)}"
            )
        grouped: list[tuple[str, ...]] = []
        grouped_stubs: list[list[stage_pb2_grpc.StageStub]] = []
        for stage in placement.stages:
            start = sum(len(g) for g in grouped)
            grouped.append(tuple(flat[start : start + stage.tp_degree]))
            grouped_stubs.append(stubs[start : start + stage.tp_degree])
        with self._load_lock:
            self._config = replace(
                self._config, placement=placement, stage_addresses=tuple(grouped)
            )
            self._stubs = grouped_stubs
            self.max_in_flight = len(placement.stages)
            self._load_all()

    @property
    def ahead_counts(self) -> tuple[int, int]:
        """Decode steps sent with tensors built ahead, and decode steps built at submit."""
        return self._ahead.hits, self._ahead.misses

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight) + len(self._failed)

    # ---- steps ---------------------------------------------------------------------------

    def submit(self, plan: StepPlan) -> None:
        try:
            tensors = self._ahead.tensors(plan)
        except Exception as exc:  # the plan's own input is bad: fail this step only
            with self._lock:
                self._failed.append(StepResult.failed(plan, f"engine error: {exc}"))
            return
        if plan.kind is not StepKind.PREFILL:  # a chunk or mixed step reads the cached KV
            kind, hop = "decode", "decoder"
        elif self._model_config.is_encoder_decoder:
            kind, hop = "encode", "encoder"
        else:
            kind, hop = "prefill", "prefill"
        # One span per step, ended when its tokens come back; every stage's span joins it
        # through the W3C context in the frame header.
        span = tracer.start_span(
            f"pipeline.{kind}",
            attributes={"exegpt.step_id": plan.step_id, "exegpt.batch_size": len(plan)},
            links=[trace.Link(context) for context in plan.trace_links],
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        with self._lock:
            load_id = self._load_id
            if not load_id:  # out of service since the engine looked: no stage would answer
                self._failed.append(StepResult.failed(plan, _UNAVAILABLE, unavailable=True))
                span.set_status(trace.Status(trace.StatusCode.ERROR, "a stage is down"))
                span.end()
                return
            addresses = self._first_hops[hop]
            self._in_flight[plan.step_id] = (plan, time.monotonic() + self._config.step_timeout_s)
            self._spans[plan.step_id] = span
        attributes = {
            "step_id": str(plan.step_id),
            "load_id": load_id,
            "micro_batch": str(plan.micro_batch),
        }
        message = TensorMessage(kind, tensors, attributes=attributes, trace_context=carrier)
        self._fanout.send(addresses, message)
        self._ahead.defer(plan)  # its successor is built while the stages compute it

    def _build_ahead(self, timeout_ms: int) -> int:
        """Build the sent steps' successors once they had `ahead_grace_s` to reach their first
        stage; returns what is left of `timeout_ms`. A result that is ready first is returned
        first: the build waits for a wait with nothing to return."""
        grace_ms = min(self._config.ahead_grace_ms, timeout_ms)
        if self._results.poll(grace_ms):
            return timeout_ms
        self._ahead.build_deferred()
        return timeout_ms - grace_ms

    def next_result(self, timeout_s: float) -> StepResult | None:
        with self._lock:
            if self._failed:
                return self._failed.pop(0)
        timeout_ms = int(min(timeout_s, _MAX_WAIT_S) * 1000)
        if self._ahead.has_deferred:
            timeout_ms = self._build_ahead(timeout_ms)
        try:
            message = self._results.recv(timeout_ms=timeout_ms)
        except TimeoutError:
            self._expire_late_steps()
            return None
        except FrameError as exc:
            logger.warning("refused a result frame: %s", exc)
            return None
        return self._result_of(message)

    def _result_of(self, message: TensorMessage) -> StepResult | None:
        try:
            step_id = int(message.attributes.get("step_id", ""))
        except ValueError:
            logger.warning("a %s message without a step id; dropped", message.kind)
            return None
        with self._lock:
            entry = self._in_flight.pop(step_id, None)
            span = self._spans.pop(step_id, None)
        if span is not None:
            span.end()
        if entry is None or message.attributes.get("load_id") != self._load_id:
            return None  # a step of an earlier load, already failed
        return result_from_message(entry[0], message)

    def _expire_late_steps(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [step for step, (_, deadline) in self._in_flight.items() if deadline < now]
        if late:
            logger.error(
                "step %d got no answer in %.0f s; reloading the stages",
                late[0],
                self._config.step_timeout_s,
            )
            self._take_out_of_service()

    # ---- loading and watching ------------------------------------------------------------

    def _load_all(self) -> None:
        with self._load_lock:
            self._load_placement()

    def _load_placement(self) -> None:
        config = self._config
        infos = self._each_rank(
            lambda stub: stub.Describe(
                stage_pb2.DescribeStageRequest(), timeout=config.health_timeout_s
            )
        )
        data = [[info.data_address for info in ranks] for ranks in infos]
        placement = config.placement
        hops = next_hops(placement, data, self.data_address)
        load_id = uuid.uuid4().hex
        requests = []
        for index, stage in enumerate(placement.stages):
            host = config.stage_addresses[index][0].rsplit(":", 1)[0]
            tp_init = f"tcp://{host}:{infos[index][0].free_port}" if stage.tp_degree > 1 else ""
            after_encoder, after_decoder = hops[index]
            requests.append(
                [
                    stage_pb2.LoadStageRequest(
                        model=config.model,
                        encoder_start=stage.encoder_layers.start,
                        encoder_stop=stage.encoder_layers.stop,
                        decoder_start=stage.decoder_layers.start,
                        decoder_stop=stage.decoder_layers.stop,
                        tp_rank=rank,
                        tp_degree=stage.tp_degree,
                        tp_init_method=tp_init,
                        num_kv_blocks=config.num_blocks,
                        kv_block_size_tokens=config.block_size_tokens,
                        next_after_encoder=after_encoder,
                        next_after_decoder=after_decoder,
                        dtype=config.dtype,
                        load_id=load_id,
                        engine_address=self.data_address,
                        role="" if stage.role == "both" else stage.role,
                    )
                    for rank in range(stage.tp_degree)
                ]
            )
        calls = [
            (self._stubs[i][r], requests[i][r])
            for i in range(len(requests))
            for r in range(len(requests[i]))
        ]
        with ThreadPoolExecutor(len(calls)) as pool:  # a TP group's ranks must join together
            futures = [
                pool.submit(stub.Load, request, timeout=config.load_timeout_s)
                for stub, request in calls
            ]
            for future in futures:
                try:
                    future.result()
                except grpc.RpcError as exc:
                    raise PipelineError(f"a stage failed to load: {exc.details()}") from None
        hops_in = first_hops(placement, data)
        # A restarted stage has a new data address: close the socket and ring of its old one.
        self._fanout.retain(address for hop in hops_in.values() for address in hop)
        with self._lock:  # a submit reads the load id and its hops together
            self._first_hops = hops_in
            self._load_id = load_id
            self._healthy = True
        logger.info(
            "pipeline loaded: %d stages, %d processes, load %s",
            len(placement.stages),
            placement.num_processes,
            load_id[:8],
        )

    def _each_rank(self, call):
        return [[call(stub) for stub in ranks] for ranks in self._stubs]

    def _watch(self) -> None:
        while not self._closing.wait(self._config.health_interval_s):
            # Judged under the load lock: a stage caught mid-load (a redeploy's, empty or
            # already on the new load id) is not a restarted one.
            with self._load_lock:
                self._check_stages()

    def _check_stages(self) -> None:
        """Take the replica out of service when a rank is down or restarted; reload it once
        every rank answers."""
        try:
            infos = self._each_rank(
                lambda stub: stub.Describe(
                    stage_pb2.DescribeStageRequest(), timeout=self._config.health_timeout_s
                )
            )
        except grpc.RpcError as exc:
            if self._healthy:
                logger.error("a stage stopped answering (%s); replica out of service", exc.code())
                self._take_out_of_service()
            return
        if all(info.loaded and info.load_id == self._load_id for ranks in infos for info in ranks):
            return
        if self._healthy:
            logger.error("a stage restarted empty; replica out of service until reloaded")
            self._take_out_of_service()
        try:
            self._load_all()
            logger.info("stages reloaded; replica back in service")
        except (PipelineError, grpc.RpcError) as exc:
            logger.warning("reload failed, retrying: %s", exc)

    def _take_out_of_service(self) -> None:
        with self._lock:
            self._healthy = False
            self._load_id = ""
            failed = [
                StepResult.failed(plan, _UNAVAILABLE, unavailable=True)
                for plan, _ in self._in_flight.values()
            ]
            self._in_flight.clear()
            for span in self._spans.values():
                span.set_status(trace.Status(trace.StatusCode.ERROR, "a stage is down"))
                span.end()
            self._spans.clear()
            self._failed.extend(failed)


_UNAVAILABLE = "replica unavailable: a pipeline stage is down"
_MAX_WAIT_S = 3600.0  # one wait's bound in ms fits an int (an infinite timeout overflows)
_CPU = torch.device("cpu")  # index math runs on the host; stages move it to their device
