"""The stage's forward loop: receive a step over ZeroMQ, run this stage's layers, pass it on.

What each kind of step does is in stage/steps.py; a decode step whose batch the engine sent
to this stage apart is first joined with its hidden state (stage/joins.py).
Every rank of a tensor-parallel stage receives the step and computes; rank 0 alone sends
it on. A step that fails here goes back to the engine as an `error`; a frame that does not
match its header is refused and logged, and the loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import zmq
from opentelemetry import propagate, trace

from exegpt.dtypes import DtypeError, torch_dtype
from exegpt.models.defaults import DEFAULT_MODEL_NAME
from exegpt.models.kv_cache import KVCachePool
from exegpt.models.loader import load_model
from exegpt.models.prepack import pack_linears
from exegpt.models.stage import build_stage, stage_kv_spec
from exegpt.models.stage_spec import LayerRange, StageSpec
from exegpt.transport import FrameError, PushFanout, TensorMessage, TensorSocket
from exegpt.v1 import stage_pb2
from services.worker.handoff import HANDOFFS_KEY, append_handoff, measured_handoff, stamp
from services.worker.stage.joins import Handoff, Joined, StepJoin
from services.worker.stage.steps import LoadedStage, run_step
from services.worker.wire import BATCH_KIND, BATCH_SENT

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.stage")

_TP_TIMEOUT_S = 60.0


class LoadError(ValueError):
    """The Load request cannot be carried out as given (INVALID_ARGUMENT)."""


@dataclass
class StageCounters:
    num_steps: int = 0
    num_errors: int = 0
    num_bad_frames: int = 0
    compute_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class StageRuntime:
    def __init__(self, data_host: str, device: str, model_roots: tuple[Path, ...] = ()) -> None:
        self._device = torch.device(device)
        self._model_roots = tuple(root.resolve() for root in model_roots)
        self._context = zmq.Context()
        self._pull = TensorSocket(self._context, zmq.PULL, same_host=True)
        self.data_address = self._pull.bind(f"tcp://{data_host}:0")
        self._fanout = PushFanout(self._context)
        self._stage: LoadedStage | None = None
        self._step_lock = threading.Lock()  # a Load waits for the step in hand
        self._joins = StepJoin()  # decode steps' batches and hidden states, until both came
        self._stopping = threading.Event()
        self._idle_since_s = time.time()  # when it last finished a step (handoff.py)
        self.counters = StageCounters()
        self._thread = threading.Thread(target=self._loop, name="stage-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._fanout.close()
        self._pull.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def loaded(self) -> LoadedStage | None:
        return self._stage

    @property
    def fanout(self) -> PushFanout:
        """The sockets (and rings) this stage sends through: only the current load's peers."""
        return self._fanout

    # ---- loading ---------------------------------------------------------------------------

    def load(self, request: stage_pb2.LoadStageRequest) -> None:
        """Replace what this stage holds; raises LoadError for a bad request."""
        spec = StageSpec(
            LayerRange(request.encoder_start, request.encoder_stop),
            LayerRange(request.decoder_start, request.decoder_stop),
            request.tp_rank,
            max(1, request.tp_degree),
        )
        # A concrete dtype only: the worker resolves `auto`, because its KV byte accounting
        # must match what every stage allocates.
        try:
            dtype = torch_dtype(request.dtype or "float32")
        except DtypeError as exc:
            raise LoadError(str(exc)) from None
        if request.num_kv_blocks < 1 or request.kv_block_size_tokens < 1:
            raise LoadError("num_kv_blocks and kv_block_size_tokens must be >= 1")
        if not request.engine_address:
            raise LoadError("engine_address is required")
        model_name = self._resolve_model(request.model)
        with self._step_lock:
            self._stage = None
            self._joins.reset()
            self._fanout.retain(_routes(request))  # old loads' peers: their sockets and rings
            loaded = load_model(model_name, device=str(self._device), dtype=dtype)
            try:
                spec.check(loaded.config)
            except ValueError as exc:
                raise LoadError(str(exc)) from None
            all_reduce = self._join_tp_group(request, spec) if spec.tp_degree > 1 else None
            model = build_stage(loaded.model, spec, all_reduce)
            pack_linears(model)  # bf16 on CPU: weights packed once for oneDNN (no-op otherwise)
            pool = None
            if len(spec.decoder_layers):
                kv_spec = stage_kv_spec(loaded.model, spec, dtype)
                pool = KVCachePool(
                    kv_spec, request.num_kv_blocks, request.kv_block_size_tokens, self._device
                )
            config = loaded.config
            self._stage = LoadedStage(
                request, spec, model, pool, spec.ends_encoder(config), spec.ends_decoder(config)
            )
        logger.info(
            "stage loaded %s: encoder %s, decoder %s, TP rank %d of %d, %d KV blocks",
            request.model,
            spec.encoder_layers,
            spec.decoder_layers,
            spec.tp_rank,
            spec.tp_degree,
            request.num_kv_blocks,
        )

    def _resolve_model(self, name: str) -> str:
        if name == DEFAULT_MODEL_NAME:
            return name
        path = Path(name).resolve()
        if not any(path.is_relative_to(root) for root in self._model_roots):
            raise LoadError(
                f"model {name!r} is neither {DEFAULT_MODEL_NAME!r} nor under a --model-root"
            )
        return str(path)

    def _join_tp_group(self, request: stage_pb2.LoadStageRequest, spec: StageSpec):
        if not request.tp_init_method:
            raise LoadError("a TP stage needs tp_init_method")
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(
            "nccl" if self._device.type == "cuda" else "gloo",
            init_method=request.tp_init_method,
            rank=spec.tp_rank,
            world_size=spec.tp_degree,
            timeout=timedelta(seconds=_TP_TIMEOUT_S),
        )

        def all_reduce(tensor: torch.Tensor) -> None:
            dist.all_reduce(tensor)

        return all_reduce

    # ---- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                message = self._pull.recv(timeout_ms=100)
            except TimeoutError:
                with self._step_lock:
                    self._joins.expire()
                    self._answer_refused()
                continue
            except FrameError as exc:
                with self.counters.lock:
                    self.counters.num_bad_frames += 1
                logger.warning("refused a frame: %s", exc)
                continue
            received_s = time.time()
            handoff = measured_handoff(
                message.attributes, message.tensors, self._idle_since_s, received_s
            )
            with self._step_lock:
                step = self._admit(message, handoff)
                if step is not None:
                    self._handle(*step)
                self._joins.expire()
                self._answer_refused()
            # Its tensors may view a sender's shared-memory slot: hand it back.
            del message, step

    def _admit(self, message: TensorMessage, handoff: Handoff) -> Joined | None:
        """The step to run now: the message itself, or the decode step it completes (None:
        dropped, or kept until its other part comes)."""
        stage = self._stage
        step_id = message.attributes.get("step_id", "?")
        if stage is None:
            logger.warning("step %s arrived before a Load; dropped", step_id)
            return None
        if message.attributes.get("load_id", "") != stage.request.load_id:
            logger.info("step %s belongs to an earlier load; dropped", step_id)
            return None
        if message.kind == BATCH_KIND:
            return self._joins.add_batch(message)
        if message.attributes.get(BATCH_SENT) and not _has_batch(message):
            return self._joins.add_hidden(message, handoff)
        return message, handoff

    def _answer_refused(self) -> None:
        """Tell the engine about each hidden state the joins refused: its step fails now."""
        stage = self._stage
        refused, self._joins.refused = self._joins.refused, []
        for entry in refused:
            with self.counters.lock:
                self.counters.num_bad_frames += 1
            logger.warning("%s", entry.reason)
            if stage is None or stage.spec.tp_rank != 0:
                continue
            attributes = {
                "step_id": entry.step_id,
                "load_id": stage.request.load_id,
                "error": entry.reason,
            }
            self._fanout.send(
                [stage.request.engine_address], TensorMessage("error", {}, attributes=attributes)
            )

    def _handle(self, message: TensorMessage, handoff: Handoff) -> None:
        stage = self._stage
        assert stage is not None  # admitted under the step lock, which a Load takes
        step_id = message.attributes.get("step_id", "?")
        load_id = stage.request.load_id
        start_s = time.perf_counter()
        parent = propagate.extract(message.trace_context)
        try:
            with (
                tracer.start_as_current_span(
                    f"stage.{message.kind}",
                    context=parent,
                    attributes={"exegpt.step_id": step_id, "exegpt.tp_rank": stage.spec.tp_rank},
                ),
                torch.inference_mode(),
            ):
                out, hop = run_step(stage, message)
        except Exception as exc:
            with self.counters.lock:
                self.counters.num_errors += 1
            logger.exception("step %s failed on this stage", step_id)
            out = TensorMessage("error", {}, attributes={"step_id": step_id, "error": str(exc)})
            hop = [stage.request.engine_address]
        elapsed_s = time.perf_counter() - start_s
        # Idle from here on (before its own send, so a reply to it is sent after this mark).
        self._idle_since_s = time.time()
        with self.counters.lock:
            self.counters.num_steps += 1
            self.counters.compute_s += elapsed_s
        if stage.spec.tp_rank != 0:
            return
        previous_s = float(message.attributes.get("compute_s", "0") or 0)
        out.attributes.setdefault("step_id", step_id)
        out.attributes["load_id"] = load_id
        out.attributes["compute_s"] = repr(previous_s + elapsed_s)
        # Each stage's own time, in route order: the engine reports them for calibration.
        stage_times = message.attributes.get("stage_s", "")
        out.attributes["stage_s"] = (
            f"{stage_times},{elapsed_s!r}" if stage_times else repr(elapsed_s)
        )
        append_handoff(out.attributes, message.attributes.get(HANDOFFS_KEY, ""), handoff)
        out.trace_context = dict(message.trace_context)
        stamp(out.attributes)
        self._fanout.send(hop, out)


def _has_batch(message: TensorMessage) -> bool:
    return any(name.startswith("batch.") for name in message.tensors)


def _routes(request: stage_pb2.LoadStageRequest) -> list[str]:
    """Every address a stage loaded with `request` sends to."""
    return [*request.next_after_encoder, *request.next_after_decoder, request.engine_address]
