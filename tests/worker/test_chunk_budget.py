"""The chunk budget on synthetic sequences (chunked.py): while a sequence decodes, a step's
chunks fit the budget left by its decodes; while none does, prefills go whole; the
long-output budget holds while every decoding sequence expects a long output. And in the
real step scheduler: a chunk retried alone gets its own step's budget."""

from __future__ import annotations

import pytest

from exegpt.generation import SamplingParams
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec
from exegpt.models.loader import load_model
from services.worker.chunked import ChunkBudget, LongOutputBudget
from services.worker.config import EngineConfig
from services.worker.executor.local import LocalExecutor
from services.worker.requests import EngineRequest
from services.worker.sequence import Sequence
from services.worker.step_plan import StepKind, StepPlan, StepResult
from services.worker.step_scheduler import StepScheduler


def _ignore(event: object) -> None:
    pass


def _pending(*prompt_lengths: int) -> list[Sequence]:
    return [
        Sequence(
            request=EngineRequest(f"r{i}", [5] * n, SamplingParams(max_tokens=4), _ignore),
            seq_id=i,
            seed=0,
            group=0,
        )
        for i, n in enumerate(prompt_lengths)
    ]


def _chunks(chosen: list[Sequence]) -> list[tuple[int, int]]:
    return [(seq.chunk_start, seq.chunk_end) for seq in chosen]


def test_while_sequences_decode_the_chunks_fit_what_the_decodes_leave() -> None:
    budget = ChunkBudget(64)
    pending = _pending(50, 30, 10)
    chosen = budget.select(pending, 64, num_decodes=4, decoding=True)
    assert _chunks(chosen) == [(0, 50), (0, 10)]  # 60 tokens left: 50, then 10 of the 30
    assert not budget.has_room(pending, 64, num_decodes=4, decoding=True)


def test_with_no_sequence_decoding_prefills_go_whole() -> None:
    budget = ChunkBudget(64)
    pending = _pending(300, 200, 5)
    assert budget.has_room(pending, 64, decoding=False)
    chosen = budget.select(pending, 64, decoding=False)
    assert _chunks(chosen) == [(0, 300), (0, 200), (0, 5)]


def test_the_long_output_budget_holds_while_every_decode_expects_a_long_output() -> None:
    budget = ChunkBudget(32, LongOutputBudget(max_tokens=128, min_output_tokens=16))
    # Every decoding sequence expects 16 or more output tokens in all: up to 128 a step.
    step_max = budget.plan_step([16.0, 30.5, 80.0])
    assert step_max == 128
    chosen = budget.select(_pending(300, 40), step_max, num_decodes=3, decoding=True)
    assert _chunks(chosen) == [(0, 125)]  # 128 - 3 decodes, all to the first prompt
    assert budget.has_room(_pending(100), step_max, num_decodes=3, decoding=True)  # 103 < 128
    # One of them expects 15.9 (say 2 so far and 13.9 to come): the fixed 32 again.
    step_max = budget.plan_step([15.9, 30.5, 80.0])
    assert step_max == 32
    chosen = budget.select(_pending(300, 40), step_max, num_decodes=3, decoding=True)
    assert _chunks(chosen) == [(0, 29)]  # 32 - 3
    assert not budget.has_room(_pending(100), step_max, num_decodes=3, decoding=True)
    # Nothing decoding: the fixed budget is planned (and the prefills go whole anyway).
    assert budget.plan_step([]) == 32


def test_without_a_long_output_budget_the_budget_stays_fixed() -> None:
    budget = ChunkBudget(32)
    assert budget.plan_step([500.0, 900.0]) == 32
    chosen = budget.select(_pending(100), 32, num_decodes=2, decoding=True)
    assert _chunks(chosen) == [(0, 30)]


@pytest.mark.parametrize(
    ("budgets", "message"),
    [
        ((64, 64, 16), r"\(64\) must exceed --max-tokens-per-step \(64\)"),
        ((None, 128, 16), "--long-output-tokens-per-step needs --max-tokens-per-step"),
        ((32, 128, 0), "--long-output-min-tokens must be >= 1"),
        ((32, 0, 16), "--long-output-tokens-per-step must be >= 1"),
        ((0, None, 16), "--max-tokens-per-step must be >= 1"),
    ],
)  # fmt: skip
def test_the_engine_config_refuses_a_bad_pair_of_budgets(budgets, message: str) -> None:
    n, m, g = budgets
    with pytest.raises(ValueError, match=message):
        EngineConfig(max_tokens_per_step=n, long_output_tokens_per_step=m, long_output_min_tokens=g)


def test_the_expected_outputs_are_read_only_as_far_as_the_choice_needs() -> None:
    read: list[float] = []

    def expected(values: list[float]):
        for value in values:
            read.append(value)
            yield value

    assert ChunkBudget(32).plan_step(expected([40.0, 50.0])) == 32
    assert read == []  # no long-output budget: nothing to estimate
    budget = ChunkBudget(32, LongOutputBudget(max_tokens=128, min_output_tokens=16))
    assert budget.plan_step(expected([40.0, 3.0, 50.0])) == 32
    assert read == [40.0, 3.0]  # the first short one decides


@pytest.fixture(scope="module")
def llama_scheduler(four_layer_models):
    """A fresh real scheduler over the real in-process model, with budgets 8 and 16 (the
    latter while every decode expects 20+ output tokens), and a function running one plan."""
    loaded = load_model(str(four_layer_models["llama-gqa"][0]))

    def make() -> tuple[StepScheduler, LocalExecutor]:
        config = EngineConfig(
            kv_block_size_tokens=4, max_tokens_per_step=8, long_output_tokens_per_step=16,
            long_output_min_tokens=20,
        )  # fmt: skip
        spec = KVCachePool.for_memory(
            KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype), config.kv_capacity_bytes,
            block_size_tokens=4,
        )  # fmt: skip
        return StepScheduler(config, loaded.config, spec.allocator), LocalExecutor(
            loaded.model, spec
        )

    return make


def _start(scheduler: StepScheduler, executor: LocalExecutor, num_short: int) -> StepPlan:
    """`num_short` requests of 20 tokens decode, then a 40-token prompt arrives; returns the
    first step that carries a chunk of it (not run)."""
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    for i in range(num_short):
        scheduler.enqueue(EngineRequest(f"s{i}", [5 + i] * 6, sampling, _ignore))
    _run(scheduler, executor, scheduler.next_plan())  # their prefill
    scheduler.enqueue(EngineRequest("long", [7] * 40, sampling, _ignore))
    plan = scheduler.next_plan()
    assert plan is not None and plan.kind is StepKind.MIXED
    return plan


def _run(scheduler: StepScheduler, executor: LocalExecutor, plan: StepPlan | None) -> None:
    assert plan is not None
    executor.submit(plan)
    result = executor.next_result(5.0)
    assert result is not None
    scheduler.complete(result)


def test_a_chunk_retried_alone_gets_its_own_steps_budget(llama_scheduler) -> None:
    scheduler, executor = llama_scheduler()
    for _ in range(8):
        scheduler.lengths.observe(40)  # every decode expects min(20 max_tokens, 40) >= 20
    plan = _start(scheduler, executor, 2)
    assert sum(len(t) for t in plan.token_ids) == 16  # 2 decodes and 14 of the prompt
    executor.submit(plan)
    failed = executor.next_result(5.0)
    assert failed is not None
    scheduler.complete(StepResult(plan.step_id, (), (), error="the step failed"))
    for _ in range(64):
        scheduler.lengths.observe(2)  # the decodes now expect (8 x 40 + 64 x 2) / 72 = 6.2
    retried = [scheduler.next_plan() for _ in range(3)]  # each row alone, none run yet
    chunk = [p for p in retried if p is not None and p.kind is StepKind.CHUNK]
    assert [len(p.token_ids[0]) for p in chunk] == [8]  # the fixed budget, not 16
