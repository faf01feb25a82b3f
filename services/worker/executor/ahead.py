"""Decode steps built ahead: a step's frames prepared while the one before it runs.

A pipeline step's wall time includes the engine's host work to build its index tensors
(block tables to KV slots, sampling rows) before anything reaches the first stage. Most of
that does not depend on the tokens the previous step returns: a running micro-batch's next
decode step is, nearly always, the same sequences one position further on, each with the
same blocks (the engine adds one only every block's worth of tokens) and one more token
counted in its sampling row. So once a decode step is sent, the executor builds the tensors
of that predicted step with placeholder tokens while the stages compute: not at once, but
when it next waits for a result, after a short grace that lets the step's frame reach its
first stage first (`defer`, then `build_deferred`). When the next plan of that micro-batch
arrives and equals the prediction in everything but its tokens, only the token tensor is
made; any other plan is built from scratch as before.

A sequence whose next token starts a block gets one the engine has not chosen yet. A KV slot
is `block * block_size + offset`, linear in the block id, so the prediction is built twice,
with placeholder ids 0 and 1 + row for those blocks: the entries that differ are the ones
that depend on a new block, and the difference names its row. When the plan arrives, each
such entry gets `block * block_size` added for the block the engine did append.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from exegpt.models.batch import BatchBuilder, batch_frame_tensors
from exegpt.models.kv_cache import SequenceKV, blocks_for
from services.worker.sampling import RowSampling, sampling_tensors
from services.worker.step_plan import StepKind, StepPlan

logger = logging.getLogger(__name__)

TOKENS = "batch.tokens"  # the one tensor of a decode step that depends on the tokens


@dataclass(frozen=True)
class _Patch:
    """Entries of one tensor that depend on new blocks: flat indexes, and each one's row."""

    name: str
    indexes: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class _Predicted:
    seq_ids: tuple[int, ...]
    kv: tuple[SequenceKV, ...]  # copies, without the blocks the engine has yet to add
    new_block_rows: tuple[bool, ...]  # rows whose tables gain one block first
    sampling: tuple[RowSampling, ...] | None  # None: rows that cannot be foreseen
    tensors: dict[str, torch.Tensor]  # batch (and, with `sampling`, sampling) tensors
    patches: tuple[_Patch, ...]


class DecodeAhead:
    """Per micro-batch, the tensors of its predicted next decode step. Both dicts are keyed by
    micro-batch id (the engine's 0..n-1, and -1 for its unsplit batch), so they hold at most
    one entry per micro-batch without any cap of their own."""

    def __init__(self, builder: BatchBuilder) -> None:
        self._builder = builder
        self._predicted: dict[int, _Predicted] = {}
        self._deferred: dict[int, StepPlan] = {}  # sent decode steps whose successor waits
        self.hits = 0
        self.misses = 0

    def defer(self, plan: StepPlan) -> None:
        """Note a step just sent; `build_deferred` builds its successor (no-op for steps that
        are not decodes). The caller picks the moment: off the way of the step's hand-off."""
        if _predictable(plan):
            self._deferred[plan.micro_batch] = plan

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def build_deferred(self) -> None:
        """Build the successors of the steps noted by `defer`."""
        plans, self._deferred = list(self._deferred.values()), {}
        for plan in plans:
            self.build_next(plan)

    def tensors(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        """The plan's batch and sampling tensors: the prediction's, with this plan's tokens
        and new blocks, when it matches; built now otherwise. Raises what building raises."""
        self._deferred.pop(plan.micro_batch, None)  # too late to build ahead
        predicted = self._predicted.pop(plan.micro_batch, None)
        new_blocks = _new_blocks(predicted, plan) if predicted is not None else None
        if predicted is None or new_blocks is None:
            if plan.kind is StepKind.DECODE:
                self.misses += 1
            return {
                **batch_frame_tensors(plan.batch(self._builder)),
                **sampling_tensors(list(plan.sampling)),
            }
        self.hits += 1
        tensors = dict(predicted.tensors)
        block_size = self._builder.block_size_tokens
        for patch in predicted.patches:
            patched = tensors[patch.name].clone()
            patched.view(-1)[patch.indexes] += new_blocks[patch.rows] * block_size
            tensors[patch.name] = patched
        placeholder = tensors[TOKENS]
        tokens = [row[0] for row in plan.token_ids]
        tensors[TOKENS] = torch.tensor(tokens, dtype=placeholder.dtype).view(placeholder.shape)
        if predicted.sampling is None:
            tensors.update(sampling_tensors(list(plan.sampling)))
        return tensors

    def build_next(self, plan: StepPlan) -> None:
        """Build and keep the predicted successor of a sent decode step (no-op for other steps).
        The executor calls it through `build_deferred`, after the step's grace."""
        if not _predictable(plan):
            return
        block_size = self._builder.block_size_tokens
        kv = tuple(
            replace(
                s,
                self_blocks=list(s.self_blocks),
                cross_blocks=list(s.cross_blocks),
                num_self_tokens=s.num_self_tokens + 1,
            )
            for s in plan.kv
        )
        new_rows = tuple(
            blocks_for(s.num_self_tokens + 1, block_size) > len(s.self_blocks) for s in kv
        )
        sampling = None
        if not any(row.penalised or row.generated for row in plan.sampling):  # these grow
            sampling = tuple(replace(row, index=row.index + 1) for row in plan.sampling)
        try:
            tensors = self._build(plan, kv, new_rows, lambda row: 0)
            patches: tuple[_Patch, ...] = ()
            if any(new_rows):
                other = self._build(plan, kv, new_rows, lambda row: 1 + row)
                patches = _patches(tensors, other, block_size)
            if sampling is not None:
                tensors.update(sampling_tensors(list(sampling)))
        except Exception:  # the real plan will be built, and any error reported, then
            logger.debug("could not build step %d's successor ahead", plan.step_id, exc_info=True)
            return
        self._predicted[plan.micro_batch] = _Predicted(
            plan.seq_ids, kv, new_rows, sampling, tensors, patches
        )

    def _build(self, plan, kv, new_rows, placeholder) -> dict[str, torch.Tensor]:
        """The successor's batch tensors, with block `placeholder(row)` where one is new."""
        grown = tuple(
            replace(s, self_blocks=[*s.self_blocks, placeholder(row)]) if new else s
            for row, (s, new) in enumerate(zip(kv, new_rows, strict=True))
        )
        successor = replace(plan, kv=grown, token_ids=tuple((0,) for _ in kv))
        return batch_frame_tensors(successor.batch(self._builder))


def _predictable(plan: StepPlan) -> bool:
    """Whether a sent step has a successor worth building ahead: a non-empty decode."""
    return plan.kind is StepKind.DECODE and len(plan) > 0


def _patches(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], block_size: int
) -> tuple[_Patch, ...]:
    """Where two builds that differ only in new blocks' ids (0 and 1 + row) differ."""
    patches = []
    for name, tensor in first.items():
        if torch.equal(tensor, second[name]):
            continue
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} depends on a block id but is not a slot tensor")
        diff = (second[name] - tensor).view(-1)
        indexes = diff.nonzero().squeeze(1)
        steps = diff[indexes]
        if bool((steps % block_size != 0).any()):
            raise ValueError(f"{name} is not linear in the block ids")
        patches.append(_Patch(name, indexes, steps // block_size - 1))
    return tuple(patches)


def _new_blocks(predicted: _Predicted, plan: StepPlan) -> torch.Tensor | None:
    """The block each row's table gained since the prediction (0 where none), or None when
    the plan is not the predicted one."""
    if plan.kind is not StepKind.DECODE or plan.seq_ids != predicted.seq_ids:
        return None
    if predicted.sampling is not None and plan.sampling != predicted.sampling:
        return None
    if any(len(row) != 1 for row in plan.token_ids):
        return None
    blocks = []
    for seq, guess, new in zip(plan.kv, predicted.kv, predicted.new_block_rows, strict=True):
        if new:
            if seq.self_blocks[:-1] != guess.self_blocks or len(seq.self_blocks) < 1:
                return None
            blocks.append(seq.self_blocks[-1])
            seq = replace(seq, self_blocks=guess.self_blocks)
        else:
            blocks.append(0)
        if seq != guess:
            return None
    return torch.tensor(blocks, dtype=torch.int64)
