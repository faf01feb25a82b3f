"""What a stage does with one step: run its layers on the step's input and say where the
output goes.

A message is a step of one kind:
- `encode` (T5): run this stage's encoder layers; the stage that ends the encoder turns the
  step into a `prefill` for the first decoder stage, carrying the encoder output along;
- `prefill` / `decode`: run this stage's decoder layers (a T5 prefill first writes the cross
  KV of its layers from the encoder output); the stage that ends the decoder samples and
  sends the tokens to the engine as a `result`;
- `kv` (WAA): a decode-group stage stores the prefill group's K/V of its layers.
A step carries its batch and sampling tensors from stage to stage, except a decode step the
engine marked `batch_sent`: the engine sent those to every stage of its route itself
(stage/joins.py), so only the hidden state goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from exegpt.models.attention import LayerKV
from exegpt.models.batch import DecodeBatch, PrefillBatch, batch_from_tensors
from exegpt.models.checkpoint import Model
from exegpt.models.kv_cache import KVCachePool
from exegpt.models.stage import stage_kv_spec
from exegpt.models.stage_spec import StageSpec
from exegpt.transport import TensorMessage
from exegpt.v1 import stage_pb2
from services.worker.sampling import logprob_tensors, rows_from_tensors, sample_rows
from services.worker.wire import BATCH_SENT

_STEP_INPUT = ("batch.", "sampling.")


@dataclass
class LoadedStage:
    request: stage_pb2.LoadStageRequest
    spec: StageSpec
    model: Model
    pool: KVCachePool | None
    ends_encoder: bool
    ends_decoder: bool


def run_step(stage: LoadedStage, message: TensorMessage) -> tuple[TensorMessage, list[str]]:
    """The step's output message and the addresses it goes to (raises on a bad step)."""
    tensors = message.tensors
    # What travels on with the step: its batch, sampling and any handed-off prefill KV.
    carried = {k: v for k, v in tensors.items() if k.startswith((*_STEP_INPUT, "kv."))}
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
        return _store_handoff(stage, message)
    if message.kind == "prefill" and request.role == "prefill":
        batch = batch_from_tensors(PrefillBatch, batch_part)
        x = _prefill_for_handoff(stage, batch, hidden, carried)
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
        if message.attributes.get(BATCH_SENT):  # the next stage has them from the engine
            carried = {k: v for k, v in carried.items() if not k.startswith(_STEP_INPUT)}
        forwarded = TensorMessage(message.kind, {**carried, "hidden": x})
        if message.attributes.get(BATCH_SENT):
            forwarded.attributes[BATCH_SENT] = "1"
        return forwarded, list(request.next_after_decoder)
    sampled = _sampled(x, tensors)
    if kind == "kv":
        sampled.tensors.update(carried)
    return TensorMessage(kind, sampled.tensors, attributes=sampled.attributes), list(
        request.next_after_decoder
    )


def _prefill_for_handoff(
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
        LayerKV(torch.zeros(shape, dtype=kv_spec.dtype), torch.zeros(shape, dtype=kv_spec.dtype))
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


def _store_handoff(stage: LoadedStage, message: TensorMessage) -> tuple[TensorMessage, list[str]]:
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
