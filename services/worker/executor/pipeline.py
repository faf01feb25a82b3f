"""PipelineExecutor: runs plans over stage processes (ZeroMQ data, gRPC control).

At start it asks every stage rank where it receives data (Describe), then loads each with
its layer range, TP rank and next hops (Load): a step enters at the first stage of its pass,
flows stage to stage, and the stage that ends the decoder sends the sampled tokens back
here. Up to one step per stage is in flight, so the stages compute at once.

A watchdog asks every rank for a sign of life; a rank that stops answering, or comes back
empty (restarted), takes the replica out of service at once: the steps in flight fail as
unavailable, and once every rank answers again the whole placement is loaded afresh under a
new load id. Messages are stamped with that id, so a stage drops steps of an earlier load.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import grpc
import torch
import zmq
from opentelemetry import propagate, trace

from exegpt.models.batch import BatchBuilder
from exegpt.models.config import ModelConfig
from exegpt.placement import Placement
from exegpt.transport import FrameError, PushFanout, TensorMessage, TensorSocket
from services.worker.executor.ahead import DecodeAhead
from services.worker.executor.pipeline_results import step_result
from services.worker.executor.routes import batch_hops, first_hops
from services.worker.executor.stage_control import PipelineConfig, PipelineError, StageControl
from services.worker.step_plan import StepKind, StepPlan, StepResult
from services.worker.wire import BATCH_KIND, BATCH_SENT

__all__ = ["PipelineConfig", "PipelineError", "PipelineExecutor"]

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
        # A decode step's successor is built while it runs (one per micro-batch in flight).
        self._ahead = DecodeAhead(builder, max_kept=len(placement.stages))
        self._context = zmq.Context()
        self._results = TensorSocket(self._context, zmq.PULL, same_host=True)
        self.data_address = self._results.bind(f"tcp://{config.data_host}:0")
        self._fanout = PushFanout(self._context)
        self._control = StageControl(config)
        self._lock = threading.Lock()
        self._load_lock = threading.RLock()  # a redeploy and the watchdog's reload
        self._in_flight: dict[int, tuple[StepPlan, float]] = {}
        self._spans: dict[int, trace.Span] = {}
        self._failed: list[StepResult] = []
        self._healthy = False
        self._load_id = ""
        self._first_hops: dict[str, list[str]] = {}
        self._batch_hops: list[str] = []  # the decode route's stages past the first
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
        self._control.close()

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
        if placement.num_processes != len(flat):
            raise ValueError(
                f"the placement needs {placement.num_processes} processes; "
                f"this replica has {len(flat)}"
            )
        grouped: list[tuple[str, ...]] = []
        for stage in placement.stages:
            start = sum(len(g) for g in grouped)
            grouped.append(tuple(flat[start : start + stage.tp_degree]))
        with self._load_lock:
            self._config = replace(
                self._config, placement=placement, stage_addresses=tuple(grouped)
            )
            self._control.regroup(placement)
            self.max_in_flight = len(placement.stages)
            self._load_all()

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
        attributes = {
            "step_id": str(plan.step_id),
            "load_id": self._load_id,
            "micro_batch": str(plan.micro_batch),
        }
        batch_hops = self._batch_hops if kind == "decode" else []
        if batch_hops:  # the later stages get the batch from here, not from stage to stage
            attributes[BATCH_SENT] = "1"
        message = TensorMessage(kind, tensors, attributes=attributes, trace_context=carrier)
        with self._lock:
            self._in_flight[plan.step_id] = (plan, time.monotonic() + self._config.step_timeout_s)
            self._spans[plan.step_id] = span
        self._fanout.send(self._first_hops[hop], message)
        if batch_hops:  # while the first stage computes
            batch = TensorMessage(BATCH_KIND, tensors, attributes=dict(attributes))
            self._fanout.send(batch_hops, batch)
        self._ahead.build_next(plan)  # while the stages compute this step

    def next_result(self, timeout_s: float) -> StepResult | None:
        with self._lock:
            if self._failed:
                return self._failed.pop(0)
        try:
            message = self._results.recv(timeout_ms=int(timeout_s * 1000))
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
        return step_result(entry[0], message)

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
        loaded = self._control.load(self._config, self.data_address)
        placement = self._config.placement
        self._load_id = loaded.load_id
        self._first_hops = first_hops(placement, loaded.data)
        self._batch_hops = batch_hops(placement, loaded.data)
        # A restarted stage has a new data address: close the socket and ring of its old one.
        routed = [*self._batch_hops, *(a for hop in self._first_hops.values() for a in hop)]
        self._fanout.retain(routed)
        self._healthy = True
        logger.info(
            "pipeline loaded: %d stages, %d processes, load %s",
            len(placement.stages),
            placement.num_processes,
            loaded.load_id[:8],
        )

    def _watch(self) -> None:
        while not self._closing.wait(self._config.health_interval_s):
            try:
                infos = self._control.describe(self._config.health_timeout_s)
            except grpc.RpcError as exc:
                if self._healthy:
                    logger.error(
                        "a stage stopped answering (%s); replica out of service", exc.code()
                    )
                    self._take_out_of_service()
                continue
            current = all(
                info.loaded and info.load_id == self._load_id for ranks in infos for info in ranks
            )
            if current:
                continue
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
                StepResult.failed(
                    plan, "replica unavailable: a pipeline stage is down", unavailable=True
                )
                for plan, _ in self._in_flight.values()
            ]
            self._in_flight.clear()
            for span in self._spans.values():
                span.set_status(trace.Status(trace.StatusCode.ERROR, "a stage is down"))
                span.end()
            self._spans.clear()
            self._failed.extend(failed)


_CPU = torch.device("cpu")  # index math runs on the host; stages move it to their device
