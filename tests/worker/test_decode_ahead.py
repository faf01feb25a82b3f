"""Decode steps built ahead (services/worker/executor/ahead.py): whatever the prediction, the
tensors a plan is sent with equal the ones built from that plan alone, for T5 (padded
decode batches) and Llama (packed, sequences of different lengths, so that some row gains a
block at most steps), through batch changes and penalised rows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from exegpt.models.batch import BatchBuilder, batch_frame_tensors
from exegpt.models.defaults import default_model_config
from exegpt.models.kv_cache import BlockAllocator, SequenceKV
from services.worker.executor.ahead import DecodeAhead
from services.worker.sampling import RowSampling, sampling_tensors
from services.worker.step_plan import StepKind, StepPlan

BLOCK_SIZE = 4
NUM_BLOCKS = 256
T5 = default_model_config()
LLAMA = dataclasses.replace(T5, family="llama", num_encoder_layers=0, ffn="swiglu")


def fresh(builder: BatchBuilder, plan: StepPlan) -> dict[str, torch.Tensor]:
    return {
        **batch_frame_tensors(plan.batch(builder)),
        **sampling_tensors(list(plan.sampling)),
    }


class Engine:
    """Just enough of the engine to make decode plans: block tables that grow, rows whose
    sampling index advances, sequences that join and leave."""

    def __init__(self, config, num_seqs: int, penalised: bool = False) -> None:
        self.config = config
        self.allocator = BlockAllocator(NUM_BLOCKS)
        self.seqs: dict[int, SequenceKV] = {}
        self.generated: dict[int, list[int]] = {}
        self.penalised = penalised
        self.step_id = 0
        for seq_id in range(num_seqs):
            self.join(seq_id, prompt_tokens=3 + seq_id)

    def join(self, seq_id: int, prompt_tokens: int) -> None:
        seq = SequenceKV()
        cross = [prompt_tokens] if self.config.is_encoder_decoder else None
        self_tokens = 1 if self.config.is_encoder_decoder else prompt_tokens
        self.allocator.grow([seq], BLOCK_SIZE, [self_tokens], cross)
        seq.num_self_tokens, seq.num_cross_tokens = self_tokens, cross[0] if cross else 0
        self.seqs[seq_id], self.generated[seq_id] = seq, []

    def plan(self, micro_batch: int = 0) -> StepPlan:
        """The next decode step of every sequence (its blocks grown first, as the engine does)."""
        seqs = list(self.seqs.values())
        self.allocator.grow(seqs, BLOCK_SIZE, [s.num_self_tokens + 1 for s in seqs], None)
        self.step_id += 1
        rows = tuple(
            RowSampling(
                0.0,
                1.0,
                7,
                len(self.generated[i]),
                presence_penalty=0.5 if self.penalised else 0.0,
                generated=tuple(self.generated[i]) if self.penalised else (),
            )
            for i in self.seqs
        )
        kv = tuple(
            dataclasses.replace(
                s, self_blocks=list(s.self_blocks), cross_blocks=list(s.cross_blocks)
            )
            for s in seqs
        )
        tokens = tuple((5 + (self.step_id * 3 + i) % 50,) for i in self.seqs)
        return StepPlan(
            self.step_id, StepKind.DECODE, tuple(self.seqs), kv, tokens, (), rows, micro_batch
        )

    def advance(self, plan: StepPlan) -> None:
        for seq_id, (token,) in zip(plan.seq_ids, plan.token_ids, strict=True):
            self.seqs[seq_id].num_self_tokens += 1
            self.generated[seq_id].append(token)


@pytest.mark.parametrize("config", [T5, LLAMA], ids=["t5", "llama"])
@pytest.mark.parametrize("penalised", [False, True], ids=["plain", "penalised"])
def test_every_step_is_sent_with_the_tensors_its_plan_builds(config, penalised: bool) -> None:
    builder = BatchBuilder(config, BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE, torch.device("cpu"))
    ahead = DecodeAhead(builder)
    engine = Engine(config, num_seqs=5, penalised=penalised)
    for step in range(24):
        if step == 9:
            engine.join(99, prompt_tokens=6)  # the batch changes: a miss, then hits again
        if step == 15:
            del engine.seqs[2]
        plan = engine.plan()
        got = ahead.tensors(plan)
        want = fresh(builder, plan)
        assert list(got) == list(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        ahead.build_next(plan)
        engine.advance(plan)
    # Every step used its prediction, new blocks included, but the first one and the two
    # after the batch changed.
    assert (ahead.hits, ahead.misses) == (21, 3)


def test_each_micro_batch_keeps_its_own_prediction() -> None:
    builder = BatchBuilder(T5, BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE, torch.device("cpu"))
    ahead = DecodeAhead(builder)
    # More micro-batches than a 2-stage pipeline has stages, as WAA schedules may run.
    groups = [Engine(T5, num_seqs=3), Engine(T5, num_seqs=4), Engine(T5, num_seqs=2)]
    for _ in range(6):
        for micro_batch, engine in enumerate(groups):
            plan = engine.plan(micro_batch)
            got, want = ahead.tensors(plan), fresh(builder, plan)
            assert all(torch.equal(got[name], want[name]) for name in want)
            ahead.build_next(plan)
            engine.advance(plan)
    assert (ahead.hits, ahead.misses) == (15, 3)  # all but each micro-batch's first step


def test_a_prefill_is_never_taken_for_a_predicted_decode() -> None:
    builder = BatchBuilder(T5, BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE, torch.device("cpu"))
    ahead = DecodeAhead(builder)
    engine = Engine(T5, num_seqs=2)
    plan = engine.plan()
    ahead.build_next(plan)
    engine.advance(plan)
    decode = engine.plan()
    prefill = dataclasses.replace(
        decode, kind=StepKind.PREFILL, token_ids=((4, 5, 6), (7, 8)), prefixes=((), ())
    )
    got, want = ahead.tensors(prefill), fresh(builder, prefill)
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert ahead.hits == 0


def test_a_deferred_successor_is_built_only_when_asked_and_dropped_once_late() -> None:
    builder = BatchBuilder(T5, BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE, torch.device("cpu"))
    ahead = DecodeAhead(builder)
    built: list[int] = []
    build_next = ahead.build_next
    ahead.build_next = lambda plan: (built.append(plan.step_id), build_next(plan))[1]
    engine = Engine(T5, num_seqs=3)
    plan = engine.plan()
    ahead.tensors(plan)
    ahead.defer(plan)
    assert ahead.has_deferred and built == []
    ahead.build_deferred()  # the executor's grace has passed: built now
    assert not ahead.has_deferred and built == [plan.step_id]
    engine.advance(plan)
    plan = engine.plan()
    got, want = ahead.tensors(plan), fresh(builder, plan)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert (ahead.hits, ahead.misses) == (1, 1)
    ahead.defer(plan)
    engine.advance(plan)
    late = engine.plan()  # its predecessor's successor was never built: built from scratch
    got, want = ahead.tensors(late), fresh(builder, late)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert (ahead.hits, ahead.misses) == (1, 2)
    ahead.build_deferred()  # the late plan took its micro-batch's deferred step: none built
    assert built == [1]


def test_every_deferred_micro_batch_gets_its_successor() -> None:
    builder = BatchBuilder(T5, BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE, torch.device("cpu"))
    ahead = DecodeAhead(builder)
    groups = [Engine(T5, num_seqs=2 + micro_batch) for micro_batch in range(4)]
    plans = [engine.plan(micro_batch) for micro_batch, engine in enumerate(groups)]
    for plan in plans:
        ahead.defer(plan)
    prefill = dataclasses.replace(plans[0], kind=StepKind.PREFILL, micro_batch=9)
    ahead.defer(prefill)  # not a decode: nothing to predict
    ahead.build_deferred()
    hit = {}
    for engine, plan in zip(groups, [*plans, prefill], strict=False):
        engine.advance(plan)
    for micro_batch, engine in [*enumerate(groups), (9, groups[0])]:
        before = ahead.hits
        ahead.tensors(engine.plan(micro_batch))
        hit[micro_batch] = ahead.hits > before
    assert hit == {0: True, 1: True, 2: True, 3: True, 9: False}
