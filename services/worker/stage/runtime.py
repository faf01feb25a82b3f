"""The stage's forward loop: receive a step over ZeroMQ, run this stage's layers, pass it on.

A message is a step of one kind:
- `encode` (T5): run this stage's encoder layers; the stage that ends the encoder turns the
  step into a `prefill` for the first decoder stage, carrying the encoder output along;
- `prefill` / `decode`: run this stage's decoder layers (a T5 prefill first writes the cross
  KV of its layers from the encoder output); the stage that ends the decoder samples and
  sends the tokens to the engine as a `result`.
Every rank of a tensor-parallel stage receives the step and computes; rank 0 alone sends
it on. A step that fails here goes back to the engine as an `error`; a frame that does not
match its header is refused and logged, and the loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import zmq
from opentelemetry import trace

from exegpt import tracing
from exegpt.compute_threads import use_threads
from exegpt.dtypes import DtypeError, torch_dtype
from exegpt.models import paged_decode
from exegpt.models.attention import LayerKV
from exegpt.models.batch import DecodeBatch, PrefillBatch, batch_from_tensors
from exegpt.models.checkpoint import Model
from exegpt.models.defaults import DEFAULT_MODEL_NAME
from exegpt.models.kv_cache import KVCachePool
from exegpt.models.loader import load_model
from exegpt.models.prepack import pack_linears
from exegpt.models.stage import build_stage, stage_kv_spec
from exegpt.models.stage_spec import LayerRange, StageSpec
from exegpt.transport import FrameError, PushFanout, TensorMessage, TensorSocket
from exegpt.v1 import stage_pb2
from services.worker.handoff import measured_handoff
from services.worker.sampling import logprob_tensors, rows_from_tensors, sample_rows
from services.worker.stage.onward import carry_on

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.stage")

_TP_TIMEOUT_S = 60.0


class LoadError(ValueError):
    """The Load request cannot be carried out as given (INVALID_ARGUMENT)."""


@dataclass
class LoadedStage:
    request: stage_pb2.LoadStageRequest
    spec: StageSpec
    model: Model
    pool: KVCachePool | None
    ends_encoder: bool
    ends_decoder: bool


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
        self._stopping = threading.Event()
        self._idle_since_s = time.time()  # when it last finished a step (handoff.py)
        self.counters = StageCounters()
        self._thread = threading.Thread(target=self._loop, name="stage-loop", daemon=True)
        self.torch_threads: int | None = None

    def start(self, torch_threads: int | None = None) -> None:
        """Run the stage loop on its thread with `torch_threads` OpenMP threads (None: the
        thread's default): the process's one computing thread (exegpt/compute_threads.py)."""
        self.torch_threads = torch_threads
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
            self._fanout.retain(_routes(request))  # old loads' peers: their sockets and rings
            loaded = load_model(model_name, device=str(self._device), dtype=dtype)
            try:
                spec.check(loaded.config)
            except ValueError as exc:
                raise LoadError(str(exc)) from None
            all_reduce = self._join_tp_group(request, spec) if spec.tp_degree > 1 else None
            model = build_stage(loaded.model, spec, all_reduce)
            pack_linears(model)  # bf16 on CPU: weights packed once for oneDNN (no-op otherwise)
            paged_decode.prepare(dtype, self._device)  # built before the first decode step
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
        use_threads(self.torch_threads)
        while not self._stopping.is_set():
            try:
                message = self._pull.recv(timeout_ms=100)
            except TimeoutError:
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
                self._handle(message, handoff)
            del message  # its tensors may view a sender's shared-memory slot: hand it back

    def _handle(self, message: TensorMessage, handoff: tuple[int, float] | None) -> None:
        stage = self._stage
        step_id = message.attributes.get("step_id", "?")
        if stage is None:
            logger.warning("step %s arrived before a Load; dropped", step_id)
            return
        load_id = message.attributes.get("load_id", "")
        if load_id != stage.request.load_id:
            logger.info("step %s belongs to an earlier load; dropped", step_id)
            return
        start_s = time.perf_counter()
        try:
            with (
                tracing.remote_child_span(
                    tracer,
                    f"stage.{message.kind}",
                    message.trace_context,
                    {"exegpt.step_id": step_id, "exegpt.tp_rank": stage.spec.tp_rank},
                ),
                torch.inference_mode(),
            ):
                out, hop = self._run(stage, message)
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
        carry_on(message, out, load_id=load_id, elapsed_s=elapsed_s, handoff=handoff)
        self._fanout.send(hop, out)

    def _run(self, stage: LoadedStage, message: TensorMessage) -> tuple[TensorMessage, list[str]]:
        tensors = message.tensors
        # What travels on with the step: its batch, sampling and any handed-off prefill KV.
        carried = {k: v for k, v in tensors.items() if k.startswith(("batch.", "sampling.", "kv."))}
        batch_part = {k[len("batch.") :]: v for k, v in carried.items() if k.startswith("batch.")}
        hidden = tensors.get("hidden")
        request = stage.request
        if message.kind == "encode":
            batch = batch_from_tensors(PrefillBatch, batch_part)
            if batch.encoder_tokens is None or batch.encoder_lengths is None:
                raise ValueError("an encode step needs encoder tokens")
            x = stage.model.encode(batch.encoder_tokens, batch.encoder_lengths, hidden)
            out = {**carried, "encoder_out": x} if stage.ends_encoder else {**carried, "hidden": x}
            kind = "prefill" if stage.ends_encoder else "encode"
            return TensorMessage(kind, out), list(request.next_after_encoder)
        if message.kind == "kv":
            return self._store_handoff(stage, message)
        if message.kind == "prefill" and request.role == "prefill":
            batch = batch_from_tensors(PrefillBatch, batch_part)
            x = self._prefill_for_handoff(stage, batch, hidden, carried)
            kind = "kv"  # the prefill group's output goes through the decode group
        elif stage.pool is None:
            raise ValueError(f"a {message.kind} step reached a stage without decoder layers")
        elif message.kind == "prefill":
            batch = batch_from_tensors(PrefillBatch, batch_part)
            encoder_out = tensors.get("encoder_out")
            if encoder_out is None:  # decoder-only
                x = stage.model.prefill(batch, stage.pool.layers, hidden)
            else:  # T5: the decoder stages write their cross KV from the encoder output
                carried["encoder_out"] = encoder_out
                x = stage.model.prefill(batch, stage.pool.layers, hidden, encoder_out)
            kind = "result"
        elif message.kind == "decode":
            batch = batch_from_tensors(DecodeBatch, batch_part)
            x = stage.model.decode(batch, stage.pool.layers, hidden)
            kind = "result"
        else:
            raise ValueError(f"unknown step kind {message.kind!r}")
        if not stage.ends_decoder:
            return TensorMessage(message.kind, {**carried, "hidden": x}), list(
                request.next_after_decoder
            )
        sampled = _sampled(x, tensors)
        if kind == "kv":
            sampled.tensors.update(carried)
        return TensorMessage(kind, sampled.tensors, attributes=sampled.attributes), list(
            request.next_after_decoder
        )

    def _prefill_for_handoff(
        self,
        stage: LoadedStage,
        batch: PrefillBatch,
        hidden: torch.Tensor | None,
        carried: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """A prefill-group stage writes its layers' K/V into scratch rows (no cache of its
        own) and adds them to the step, named by global layer, for the decode group."""
        write_slots = batch.self_kv.write_slots
        if write_slots is None:
            raise ValueError("a prefill step needs write slots")
        kv_spec = stage_kv_spec(stage.model, stage.spec, stage.model.compute_dtype)
        shape = (write_slots.numel(), kv_spec.num_kv_heads, kv_spec.head_dim)
        scratch = [
            LayerKV(
                torch.zeros(shape, dtype=kv_spec.dtype), torch.zeros(shape, dtype=kv_spec.dtype)
            )
            for _ in range(len(stage.spec.decoder_layers))
        ]
        rows = torch.arange(write_slots.numel())
        local = replace(batch, self_kv=replace(batch.self_kv, write_slots=rows))
        x = stage.model.prefill(local, scratch, hidden)
        first = stage.spec.decoder_layers.start
        for offset, layer_kv in enumerate(scratch):
            carried[f"kv.{first + offset}.k"] = layer_kv.k
            carried[f"kv.{first + offset}.v"] = layer_kv.v
        return x

    def _store_handoff(
        self, stage: LoadedStage, message: TensorMessage
    ) -> tuple[TensorMessage, list[str]]:
        """A decode-group stage stores its layers' handed-off prefill K/V in its cache."""
        if stage.pool is None:
            raise ValueError("handed-off KV reached a stage without decoder layers")
        tensors = message.tensors
        write_slots = tensors.get("batch.self_kv.write_slots")
        if write_slots is None:
            raise ValueError("handed-off KV without its write slots")
        spec = stage.spec
        for offset, layer in enumerate(range(spec.decoder_layers.start, spec.decoder_layers.stop)):
            cache = stage.pool.layers[offset]
            for name, target in (("k", cache.k), ("v", cache.v)):
                rows = tensors[f"kv.{layer}.{name}"]
                if spec.tp_degree > 1:  # this rank's KV heads
                    part = rows.shape[1] // spec.tp_degree
                    rows = rows[:, spec.tp_rank * part : (spec.tp_rank + 1) * part]
                target.index_copy_(0, write_slots, rows.to(target.dtype))
        next_hop = list(stage.request.next_after_decoder)
        if not stage.ends_decoder:
            return TensorMessage("kv", dict(tensors), attributes=dict(message.attributes)), next_hop
        result = {
            name: tensor
            for name, tensor in tensors.items()
            if name in ("token_ids", "failed") or name.startswith("logprob.")
        }
        attributes = {"row_error": message.attributes.get("row_error", "")}
        return TensorMessage("result", result, attributes=attributes), next_hop


def _routes(request: stage_pb2.LoadStageRequest) -> list[str]:
    """Every address a stage loaded with `request` sends to."""
    return [*request.next_after_encoder, *request.next_after_decoder, request.engine_address]


@dataclass
class _Sampled:
    tensors: dict[str, torch.Tensor]
    attributes: dict[str, str]


def _sampled(logits: torch.Tensor, tensors: dict[str, torch.Tensor]) -> _Sampled:
    rows = rows_from_tensors(tensors)
    sampled = sample_rows(logits, rows)
    failed = [error is not None for error in sampled.errors]
    row_error = next((e for e in sampled.errors if e is not None), "")
    return _Sampled(
        {
            "token_ids": torch.tensor(sampled.token_ids, dtype=torch.int64),
            "failed": torch.tensor(failed, dtype=torch.int8),
            **logprob_tensors(sampled, rows),
        },
        {"row_error": row_error},
    )
