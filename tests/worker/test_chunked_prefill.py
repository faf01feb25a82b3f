"""Chunked prefill (--max-tokens-per-step) on the real engine: greedy tokens equal the
unchunked ones (in process, under preemption by recompute, over 2 pipeline stages), no step
carries more tokens than the budget, a long prompt's chunks share steps with the running
decodes (mixed steps), the long-output budget binds only while every decode expects a long
output, and a budget for T5 is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from exegpt.commands import cli
from exegpt.generation import SamplingParams
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec
from exegpt.models.loader import LoadedModel, load_model
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from services.worker.executor.local import LocalExecutor
from services.worker.executor.pipeline_config import PipelineConfig
from services.worker.policies import EnginePolicy, PolicyConfig
from services.worker.requests import EngineRequest
from services.worker.server import build_engine, build_pipeline_engine
from services.worker.step_plan import StepKind, StepPlan
from services.worker.step_scheduler import StepScheduler
from tests.worker.stages import StagePool
from tests.worker.test_engine import submit
from tests.worker.test_pipeline import topologies

BLOCK = 4
NUM_TOKENS = 6
# Lengths around the chunk boundaries of budgets 4 and 5 (and the 4-token blocks).
PROMPTS = [[(7 * i + 3 * j) % 190 + 5 for j in range(n)] for i, n in enumerate([3, 4, 5, 8, 9, 13])]
# Uneven lengths: in a batch of 2, a prompt is admitted while the other request decodes (with
# no sequence decoding, prompts are prefilled whole), so it is chunked into mixed steps.
STAGGERED = [NUM_TOKENS, 2 * NUM_TOKENS] * 3
BYTES_PER_TOKEN = 4 * 2 * 16 * 2 * 4  # llama-gqa: layers x KV heads x head dim x K,V x fp32


@pytest.fixture(scope="module")
def llama(four_layer_models) -> tuple[Path, LoadedModel]:
    path = four_layer_models["llama-gqa"][0]
    return path, load_model(str(path))


def _run(
    engine, prompts: list[list[int]], num_tokens: int | list[int] = NUM_TOKENS
) -> list[list[int]]:
    """Every request queued before the engine starts, so that batches do not depend on when
    the engine thread wakes. `num_tokens`: one for all, or one per prompt."""
    counts = num_tokens if isinstance(num_tokens, list) else [num_tokens] * len(prompts)
    collectors = [
        submit(engine, p, f"r{i}", max_tokens=n, ignore_eos=True)
        for i, (p, n) in enumerate(zip(prompts, counts, strict=True))
    ]
    engine.start()
    try:
        outputs = []
        for collector in collectors:
            collector.wait()
            assert collector.events[-1].error is None, collector.events[-1].error
            outputs.append(collector.token_ids)
        return outputs
    finally:
        engine.stop()


def _pool(loaded: LoadedModel, config: EngineConfig) -> KVCachePool:
    return KVCachePool.for_memory(
        KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype),
        config.kv_capacity_bytes,
        block_size_tokens=BLOCK,
    )


def _config(budget: int | None, max_batch_size: int = 8, **options) -> EngineConfig:
    return EngineConfig(
        max_batch_size=max_batch_size,
        kv_block_size_tokens=BLOCK,
        max_tokens_per_step=budget,
        **options,
    )


@pytest.mark.parametrize("policy", list(EnginePolicy))
@pytest.mark.parametrize("budget", [4, 5])
def test_chunked_greedy_tokens_equal_unchunked_in_process(llama, budget: int, policy) -> None:
    _, loaded = llama
    policy_config = PolicyConfig(policy)
    unchunked = build_engine(loaded, _config(None, policy=policy_config))
    expected = _run(unchunked, PROMPTS, STAGGERED)
    chunked = build_engine(loaded, _config(budget, 2, policy=policy_config))
    kinds: list[StepKind] = []
    chunked.step_observers.append(lambda kind, num_rows, result: kinds.append(kind))
    assert _run(chunked, PROMPTS, STAGGERED) == expected
    assert StepKind.MIXED in kinds


def test_a_preempted_chunked_request_is_recomputed_in_chunks_with_the_same_tokens(llama) -> None:
    _, loaded = llama
    num_tokens = 16
    expected = _run(build_engine(loaded, _config(None)), PROMPTS, num_tokens)
    # 12 blocks of 4: the six requests grow past them, so the newest are preempted.
    capacity = 12 * BLOCK * BYTES_PER_TOKEN + BYTES_PER_TOKEN
    config = _config(5, kv_capacity_bytes=capacity)
    pool = _pool(loaded, config)
    executor = PlanRecordingExecutor(loaded.model, pool)
    engine = Engine(
        executor,
        config,
        model_config=loaded.config,
        num_blocks=pool.num_blocks,
        bytes_per_block=pool.bytes_per_block,
    )
    assert _run(engine, PROMPTS, num_tokens) == expected
    assert engine.stats().num_preemptions > 0
    # A chunk row of several tokens reaching past the longest prompt holds generated tokens:
    # a recompute, continued in chunk steps like a prompt (a decode row carries one token).
    longest_prompt = max(len(p) for p in PROMPTS)
    recompute_chunks = [
        (start, len(tokens))
        for plan in executor.plans
        if plan.kind in (StepKind.CHUNK, StepKind.MIXED)
        for start, tokens in zip(plan.starts, plan.token_ids, strict=True)
        if len(tokens) > 1 and start + len(tokens) > longest_prompt
    ]
    assert recompute_chunks


class PlanRecordingExecutor(LocalExecutor):
    """The in-process executor, keeping every plan it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plans: list[StepPlan] = []

    def submit(self, plan: StepPlan) -> None:
        self.plans.append(plan)
        super().submit(plan)


def test_chunked_tokens_over_two_pipeline_stages_equal_unchunked(
    llama, stage_pool: StagePool
) -> None:
    path, loaded = llama
    expected = _run(build_engine(loaded, _config(None)), PROMPTS, STAGGERED)
    placement, layout = topologies(False)["pp2"]
    pipeline = PipelineConfig(
        model=str(path),
        dtype="float32",
        placement=placement,
        stage_addresses=stage_pool.addresses(layout),
        num_blocks=64,
        block_size_tokens=BLOCK,
    )
    config = _config(4, max_batch_size=4, num_micro_batches=2)
    engine = build_pipeline_engine(loaded, config, pipeline)
    kinds: list[StepKind] = []
    engine.step_observers.append(lambda kind, num_rows, result: kinds.append(kind))
    assert _run(engine, PROMPTS, STAGGERED) == expected
    assert StepKind.MIXED in kinds  # decodes and chunks shared steps across the stages


def _drive(
    loaded: LoadedModel,
    budget: int | None,
    long_prompt: list[int],
    max_batch_size: int = 8,
    seen_lengths: tuple[int, ...] = (),
    **options,
):
    """Two short requests decode; after 3 steps a long prompt arrives. Returns every plan
    (there must always be one to run) and the tokens of each request (the real scheduler
    over the real in-process model). `seen_lengths`: output lengths of earlier requests the
    scheduler has learned; `options`: more EngineConfig fields."""
    config = _config(budget, max_batch_size, **options)
    pool = _pool(loaded, config)
    scheduler = StepScheduler(config, loaded.config, pool.allocator)
    for length in seen_lengths:
        scheduler.lengths.observe(length)
    executor = LocalExecutor(loaded.model, pool)
    tokens: dict[str, list[int]] = {}

    def request(request_id: str, prompt: list[int]) -> EngineRequest:
        sampling = SamplingParams(max_tokens=20, ignore_eos=True)
        return EngineRequest(request_id, prompt, sampling, lambda event: None)

    for i, prompt in enumerate(PROMPTS[:2]):
        scheduler.enqueue(request(f"short{i}", prompt))
    plans: list[StepPlan] = []
    while scheduler.has_work():
        if len(plans) == 3:
            scheduler.enqueue(request("long", long_prompt))
        plan = scheduler.next_plan()
        assert plan is not None
        plans.append(plan)
        executor.submit(plan)
        result = executor.next_result(0.0)
        assert result is not None
        for delivery in scheduler.complete(result):
            tokens.setdefault(delivery.request.request_id, []).extend(delivery.event.token_ids)
    return plans, tokens


def _is_decode_row(plan: StepPlan, row: int) -> bool:
    return plan.kv[row].num_self_tokens > 0  # prefilled before the step


def _prompt_tokens(plan: StepPlan) -> int:
    return sum(len(t) for i, t in enumerate(plan.token_ids) if not _is_decode_row(plan, i))


def _num_decodes(plan: StepPlan) -> int:
    return sum(_is_decode_row(plan, i) for i in range(len(plan)))


def test_a_long_prompt_is_chunked_into_the_steps_of_the_running_decodes(llama) -> None:
    _, loaded = llama
    long_prompt = [(11 * j) % 190 + 5 for j in range(40)]
    whole_plans, whole_tokens = _drive(loaded, None, long_prompt)
    plans, tokens = _drive(loaded, 8, long_prompt)
    assert tokens == whole_tokens  # same greedy tokens for all three requests
    # Unchunked, one step carries the whole prompt between two decodes of the others.
    assert max(_prompt_tokens(p) for p in whole_plans) == 40
    # Chunked, decodes count in the budget: no step carries more than 8 tokens in all.
    assert all(sum(len(t) for t in p.token_ids) <= 8 for p in plans)
    carrying = [p for p in plans if 2 in p.seq_ids and _prompt_tokens(p) > 0]  # the long one
    # Each of its chunks rides along with both running decodes: 40 tokens in 6 + ... + 4.
    assert [p.kind for p in carrying] == [StepKind.MIXED] * 7
    assert all(_num_decodes(p) == 2 and _prompt_tokens(p) <= 6 for p in carrying)
    # The running requests never wait through a prompt: every step decodes them.
    assert _max_stall(plans) == 0 < _max_stall(whole_plans)


LONG_OUTPUT_CHUNKS = [14, 14, 12]  # 16 a step: 2 decodes and 14 of the 40-token prompt
FIXED_CHUNKS = [6, 6, 6, 6, 6, 6, 4]  # 8 a step: 2 decodes and 6 of the prompt


@pytest.mark.parametrize(
    ("seen_lengths", "min_output", "chunks"),
    [
        ((40,) * 8, 20, LONG_OUTPUT_CHUNKS),  # learned: min(20 max_tokens, 40) >= 20
        ((40,) * 8, 21, FIXED_CHUNKS),  # the same expected 20, short of 21
        ((12,) * 8, 10, LONG_OUTPUT_CHUNKS),  # learned short outputs, 12 >= 10
        ((12,) * 8, 16, FIXED_CHUNKS),  # 12 < 16, though max_tokens is 20
        ((40,) * 7, 12, FIXED_CHUNKS),  # 7 lengths (< 8 min_samples): no estimate yet
        ((), 12, FIXED_CHUNKS),  # a fresh replica: the fixed budget, not max_tokens' 20
        ((), 4, [6, 14, 14, 6]),  # no estimate, but 4 tokens so far from the 2nd chunk on
    ],
)
def test_the_long_output_budget_binds_while_every_decode_expects_a_long_output(
    llama, seen_lengths: tuple[int, ...], min_output: int, chunks: list[int]
) -> None:
    """Each running request asks for 20 tokens and decodes fewer than 12 while the prompt
    is chunked. With 8 or more lengths seen beyond its tokens so far, it expects their
    mean, capped by max_tokens; with fewer, only its tokens so far (3 to 9 here)."""
    _, loaded = llama
    long_prompt = [(11 * j) % 190 + 5 for j in range(40)]
    options = {"long_output_tokens_per_step": 16, "long_output_min_tokens": min_output}
    plans, tokens = _drive(loaded, 8, long_prompt, seen_lengths=seen_lengths, **options)
    _, whole_tokens = _drive(loaded, None, long_prompt)
    assert tokens == whole_tokens
    carrying = [p for p in plans if 2 in p.seq_ids and _prompt_tokens(p) > 0]
    assert [_prompt_tokens(p) for p in carrying] == chunks
    assert all(p.kind is StepKind.MIXED and _num_decodes(p) == 2 for p in carrying)


def test_decodes_that_fill_the_budget_leave_every_other_step_to_a_chunk(llama) -> None:
    _, loaded = llama
    long_prompt = [(11 * j) % 190 + 5 for j in range(10)]
    plans, tokens = _drive(loaded, 2, long_prompt)  # two decodes fill a budget of 2
    _, whole_tokens = _drive(loaded, None, long_prompt)
    assert tokens == whole_tokens
    carrying = [i for i, p in enumerate(plans) if 2 in p.seq_ids and _prompt_tokens(p) > 0]
    assert [plans[i].kind for i in carrying] == [StepKind.CHUNK] * 5  # 10 tokens by 2
    # Between two of its chunks, one step decodes the running requests.
    assert all(after - before == 2 for before, after in zip(carrying, carrying[1:], strict=False))
    assert all(plans[i + 1].kind is StepKind.DECODE for i in carrying[:-1])


def test_decodes_go_on_while_a_waiting_request_cannot_start(llama) -> None:
    _, loaded = llama
    long_prompt = [(11 * j) % 190 + 5 for j in range(10)]
    # The batch holds two: the long request waits until a short one finishes, while the two
    # decodes fill the budget; every step still runs (_drive asserts a plan each time).
    plans, tokens = _drive(loaded, 2, long_prompt, max_batch_size=2)
    _, whole_tokens = _drive(loaded, None, long_prompt, max_batch_size=2)
    assert tokens == whole_tokens
    both = next(i for i, p in enumerate(plans) if _num_decodes(p) == 2)
    first_chunk = next(i for i, p in enumerate(plans) if 2 in p.seq_ids)
    assert first_chunk - both >= 15  # it started once a short request had its 20 tokens
    assert all(p.kind is StepKind.DECODE and len(p) == 2 for p in plans[both:first_chunk])


def _max_stall(plans: list[StepPlan]) -> int:
    """The most prompt tokens the running requests wait through, in steps that do not decode
    them, between two of their decodes."""
    stall: int | None = None  # none before the first decode
    worst = 0
    for plan in plans:
        if _num_decodes(plan):
            worst, stall = max(worst, stall or 0), 0
        elif stall is not None:
            stall += _prompt_tokens(plan)
    return worst


def test_a_budget_for_t5_is_refused_with_a_clear_error() -> None:
    loaded = load_model("exegpt-tiny-t5")
    with pytest.raises(ValueError, match="needs a decoder-only model"):
        build_engine(loaded, _config(4))


def test_the_worker_refuses_a_budget_for_t5_at_start(caplog: pytest.LogCaptureFixture) -> None:
    args = ["worker", "--model", "exegpt-tiny-t5", "--port", "0", "--max-tokens-per-step", "4"]
    assert cli.main(args) == 1
    assert "worker failed to start: --max-tokens-per-step" in caplog.text


def test_the_load_counts_the_prompt_tokens_an_admitted_request_has_yet_to_chunk(llama) -> None:
    _, loaded = llama
    config = _config(8)
    pool = _pool(loaded, config)
    scheduler = StepScheduler(config, loaded.config, pool.allocator)
    executor = LocalExecutor(loaded.model, pool)

    def step() -> StepPlan:
        plan = scheduler.next_plan()
        assert plan is not None
        executor.submit(plan)
        result = executor.next_result(5.0)
        assert result is not None
        scheduler.complete(result)
        return plan

    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    scheduler.enqueue(EngineRequest("short", PROMPTS[0], sampling, lambda event: None))
    step()  # its prefill: it decodes from now on
    scheduler.enqueue(EngineRequest("long", [5] * 40, sampling, lambda event: None))
    assert scheduler.snapshot().num_pending_prefill_tokens == 40  # queued
    assert step().kind is StepKind.MIXED  # one decode and 7 of its tokens
    assert scheduler.snapshot().num_pending_prefill_tokens == 33  # admitted, 33 to chunk
    step()
    assert scheduler.snapshot().num_pending_prefill_tokens == 26


def test_the_worker_refuses_a_long_output_budget_not_above_the_budget(
    llama, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = llama
    args = ["worker", "--model", str(path), "--port", "0", "--max-tokens-per-step", "32"]
    assert cli.main([*args, "--long-output-tokens-per-step", "32"]) == 1
    assert "must exceed --max-tokens-per-step (32)" in caplog.text
