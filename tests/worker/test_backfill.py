"""memory_aware's backfill on hand-computed cases: the step at which a blocked head is
predicted to fit (exegpt/output_lengths.predicted_start_step), and in the real step
scheduler, a request behind a head that does not fit admitted when it is predicted to finish
by then, a longer one not, and neither with backfill off."""

from __future__ import annotations

import argparse
import math

import pytest

from exegpt.generation import SamplingParams
from exegpt.models.kv_cache import BlockAllocator
from exegpt.models.loader import load_model
from exegpt.output_lengths import BACKFILL_WINDOW, predicted_start_step
from services.scheduler.simulator.kv_policy import SimRequest, simulate_kv_policy
from services.worker.__main__ import add_arguments, policy_from_args
from services.worker.config import EngineConfig
from services.worker.policies import EnginePolicy, KvState, Load, PolicyConfig, make_policy
from services.worker.requests import EngineRequest
from services.worker.step_plan import StepKind, StepPlan, StepResult
from services.worker.step_scheduler import StepScheduler


def _blocks_at(prompt_tokens: int, num_generated: int) -> int:
    return math.ceil((prompt_tokens + num_generated) / 4)


def test_the_head_is_predicted_to_start_at_the_first_finish_that_leaves_it_room() -> None:
    # A: 16 + 4 tokens, 4 to come (5 -> 6 blocks); B: 32 + 4, 8 to come (9 -> 11); the head
    # H: 40 tokens, 8 to come (10 -> 12). Finishes at steps 0, 4 and 8.
    a, b, head = (16, 4, 4), (32, 4, 8), (40, 0, 8)
    # From step 0: at t = 4 A holds 6, B 10 and H 11 = 27. From step 4 (A done): B, advanced
    # to 8 generated with 4 to come, holds 11 at t = 4 beside H's 11 = 22.
    assert predicted_start_step([a, b], head, 27, _blocks_at) == 0
    assert predicted_start_step([a, b], head, 26, _blocks_at) == 4
    assert predicted_start_step([a, b], head, 22, _blocks_at) == 4
    assert predicted_start_step([a, b], head, 21, _blocks_at) == 8  # H alone: 12
    assert predicted_start_step([a, b], head, 11, _blocks_at) == 8  # never fits: the last finish
    assert predicted_start_step([], head, 12, _blocks_at) == 0


def test_only_memory_aware_with_backfill_lets_requests_pass_a_blocked_head() -> None:
    running = (Load(32, 4, 12, seq_id=0),)  # no lengths seen: predicted to reach max_tokens
    state = KvState(23, 23 - 9, running, _blocks_at)  # watermark 1: budget 22
    head = Load(40, 0, 8)  # 12 blocks beside the running one's 11 at step 8: from step 8 on
    aware = make_policy(PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=True))
    assert not aware.can_admit(head, state)
    assert aware.backfill_steps(head, state) == 8
    strict = make_policy(PolicyConfig(EnginePolicy.MEMORY_AWARE))  # off by default
    assert strict.backfill_steps(head, state) == 0
    assert make_policy(PolicyConfig(EnginePolicy.FCFS)).backfill_steps(head, state) == 0


def _enqueue(
    scheduler: StepScheduler, request_id: str, prompt_tokens: int, max_tokens: int
) -> None:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    scheduler.enqueue(EngineRequest(request_id, [5] * prompt_tokens, sampling, print))


def _run_step(scheduler: StepScheduler) -> StepPlan:
    """Plan a step and complete it at once, every row sampling token 7."""
    plan = scheduler.next_plan()
    assert plan is not None
    rows = len(plan.seq_ids)
    scheduler.complete(StepResult(plan.step_id, (7,) * rows, (None,) * rows))
    return plan


@pytest.fixture(scope="module")
def llama_config(four_layer_models):
    return load_model(str(four_layer_models["llama-gqa"][0])).config


@pytest.mark.parametrize("max_batch_size", [2, 3, 32])
@pytest.mark.parametrize("backfill", [True, False])
def test_a_short_request_passes_a_head_that_does_not_fit(
    llama_config, backfill: bool, max_batch_size: int
) -> None:
    """20 blocks of 4 tokens (watermark 1: budget 19); Llama holds prompt + generated - 1
    tokens. R0 (prompt 20, max_tokens 24) runs, predicted to end with 11 blocks at step 24.
    H (prompt 44, max_tokens 8) would hold 13 beside R0's 7 at step 8: 20 > 19, so it waits
    until step 24. L (prompt 4, max_tokens 30) fits (11 + 7 = 18 at step 24) but would still
    run at step 24: it waits. S (prompt 4, max_tokens 4) fits (peak 6 + 2 at step 4, then 11)
    and ends by step 24: it passes, even with one batch slot left (neither H's place nor L's
    crowds it out of the candidates read)."""
    config = EngineConfig(
        kv_block_size_tokens=4,
        max_batch_size=max_batch_size,
        policy=PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=backfill),
    )
    scheduler = StepScheduler(config, llama_config, BlockAllocator(20))

    _enqueue(scheduler, "R0", 20, 24)
    first = scheduler.next_plan()
    assert first is not None and first.kind is StepKind.PREFILL and len(first.token_ids) == 1
    for request_id, prompt_tokens, max_tokens in (("H", 44, 8), ("L", 4, 30), ("S", 4, 4)):
        _enqueue(scheduler, request_id, prompt_tokens, max_tokens)
    plan = scheduler.next_plan()  # R0's prefill is in flight: only admissions can run
    if backfill:
        assert plan is not None and plan.kind is StepKind.PREFILL
        assert [len(tokens) for tokens in plan.token_ids] == [4]  # S alone
    else:
        assert plan is None
    assert scheduler.num_waiting() == (2 if backfill else 3)
    # H blocked and got a deadline (kept until it leaves the queue, whoever blocks between);
    # aborted, it takes its deadline with it.
    assert len(scheduler._backfill_deadlines) == 1
    scheduler.request_abort("H")
    scheduler.apply_aborts()
    assert len(scheduler._backfill_deadlines) == 0


def test_the_worker_flag_turns_backfill_on() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", "m", "--engine-policy", "memory_aware"]
    assert not policy_from_args(parser.parse_args(base)).backfill
    assert policy_from_args(parser.parse_args([*base, "--backfill"])).backfill


@pytest.mark.parametrize("policy", ["fcfs", "sjf"])
def test_backfill_under_another_policy_is_refused(policy: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--engine-policy", policy, "--backfill"])
    with pytest.raises(ValueError, match="backfill.*memory_aware"):
        policy_from_args(args)
    with pytest.raises(ValueError, match="backfill.*memory_aware"):
        PolicyConfig(EnginePolicy(policy), backfill=True)


@pytest.mark.parametrize("max_tokens_per_step", [None, 2])
def test_a_chunked_prefill_counts_its_steps_against_the_window(
    llama_config, max_tokens_per_step: int | None
) -> None:
    """As above, R0 runs and H waits until step 24. L2 (prompt 8, max_tokens 22) fits beside
    R0 (11 + 8 = 19 blocks at step 22) and decodes in 22 steps: unchunked it passes H; in
    chunks of 2 its prefill takes 3 steps more, 25 > 24, and it waits."""
    config = EngineConfig(
        kv_block_size_tokens=4,
        max_tokens_per_step=max_tokens_per_step,
        policy=PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=True),
    )
    scheduler = StepScheduler(config, llama_config, BlockAllocator(20))
    for request_id, prompt_tokens, max_tokens in (("R0", 20, 24), ("H", 44, 8), ("L2", 8, 22)):
        _enqueue(scheduler, request_id, prompt_tokens, max_tokens)
        if request_id == "R0":
            assert scheduler.next_plan() is not None  # R0 alone, in flight from here on
    plan = scheduler.next_plan()
    if max_tokens_per_step is None:
        assert plan is not None and [len(t) for t in plan.token_ids] == [8]  # L2 whole
    else:
        assert plan is None


def test_the_head_s_deadline_is_not_moved_out_by_a_sequence_outliving_its_prediction(
    llama_config,
) -> None:
    """Outputs of 4 seen: R0 (prompt 20, max_tokens 24, generating all 24) is predicted to end
    with 4. H (prompt 56) would hold 15 blocks beside R0's 6 (21 > budget 19): predicted to
    fit 3 steps on, when it first blocks at step 1, so its deadline is step 4. S1 (2 tokens)
    ends by then and passes. R0 runs on past 4 tokens and is predicted again (max_tokens: 16
    more); a window recomputed from now would let S2 pass too, but step 4 has gone: S2
    waits behind H."""
    config = EngineConfig(
        kv_block_size_tokens=4, policy=PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=True)
    )
    scheduler = StepScheduler(config, llama_config, BlockAllocator(20))
    for _ in range(8):
        scheduler.lengths.observe(4)

    _enqueue(scheduler, "R0", 20, 24)
    _run_step(scheduler)  # R0's prefill: step 1
    _enqueue(scheduler, "H", 56, 8)
    _enqueue(scheduler, "S1", 4, 2)
    assert [len(tokens) for tokens in _run_step(scheduler).token_ids] == [4]  # S1 passes H
    for _ in range(5):  # S1 ends in the first; R0 reaches 6 tokens, past its prediction
        assert _run_step(scheduler).kind is StepKind.DECODE
    assert (scheduler.snapshot().num_running, scheduler.num_waiting()) == (1, 1)
    _enqueue(scheduler, "S2", 4, 2)
    assert _run_step(scheduler).kind is StepKind.DECODE  # R0 alone: S2 does not pass
    assert scheduler.num_waiting() == 2


@pytest.mark.parametrize(("prompt_tokens", "cause"), [(44, "policy"), (60, "free_blocks")])
def test_each_call_the_head_waits_is_counted_by_its_cause(
    llama_config, prompt_tokens: int, cause: str
) -> None:
    """R0 (prompt 20: 5 of 20 blocks) runs. A head of 44 tokens takes 11 blocks + the
    watermark, within the 15 free, but memory_aware's predicted peak refuses it; one of 60
    takes 15 + 1 > 15: no free blocks."""
    config = EngineConfig(kv_block_size_tokens=4, policy=PolicyConfig(EnginePolicy.MEMORY_AWARE))
    scheduler = StepScheduler(config, llama_config, BlockAllocator(20))
    for request_id, prompt, max_tokens in (("R0", 20, 24), ("H", prompt_tokens, 8)):
        _enqueue(scheduler, request_id, prompt, max_tokens)
        assert (scheduler.next_plan() is None) == (request_id == "H")
    assert scheduler.next_plan() is None
    assert dict(scheduler.head_waits) == {cause: 2}


@pytest.mark.parametrize("num_long", [BACKFILL_WINDOW - 1, BACKFILL_WINDOW])
def test_backfill_reads_a_window_behind_the_blocked_head(llama_config, num_long: int) -> None:
    """The case above with L repeated: S is the window's last candidate behind H after
    BACKFILL_WINDOW - 1 of them and passes; one more and S is beyond it and waits."""
    config = EngineConfig(
        kv_block_size_tokens=4, policy=PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=True)
    )
    scheduler = StepScheduler(config, llama_config, BlockAllocator(20))
    requests = [("R0", 20, 24), ("H", 44, 8)]
    requests += [(f"L{i}", 4, 30) for i in range(num_long)] + [("S", 4, 4)]
    for request_id, prompt_tokens, max_tokens in requests:
        _enqueue(scheduler, request_id, prompt_tokens, max_tokens)
        if request_id == "R0":
            assert scheduler.next_plan() is not None  # R0's prefill, in flight
    plan = scheduler.next_plan()
    if num_long < BACKFILL_WINDOW:
        assert plan is not None and [len(tokens) for tokens in plan.token_ids] == [4]  # S
    else:
        assert plan is None
    # The simulator reads the same window.
    waiting = [SimRequest(44, 8, 8)] + [SimRequest(4, 30, 30)] * num_long + [SimRequest(4, 4, 4)]
    starts = simulate_kv_policy(
        [SimRequest(20, 24, 24), *waiting], "memory_aware", num_blocks=20,
        block_size_tokens=4, max_batch_size=64, backfill=True,
    ).first_admitted_steps  # fmt: skip
    assert (starts[-1] < starts[1]) == (num_long < BACKFILL_WINDOW)


def test_the_backfill_clock_counts_a_step_of_every_sequence_with_groups_empty(
    llama_config,
) -> None:
    """Two micro-batch groups, one sequence: every plan is a step of it, so the clock that
    deadlines are set in keeps up with its tokens (an empty group makes no plan)."""
    config = EngineConfig(
        kv_block_size_tokens=4,
        num_micro_batches=2,
        policy=PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=True),
    )
    scheduler = StepScheduler(config, llama_config, BlockAllocator(20))
    _enqueue(scheduler, "R0", 20, 24)
    for _ in range(10):
        assert len(_run_step(scheduler).seq_ids) == 1
    assert scheduler._clock() == 10


def test_the_backfill_clock_keeps_up_when_chunks_ride_in_another_group_s_plans(
    llama_config,
) -> None:
    """Two groups: A decodes in one, B's long prompt is chunk-prefilled in the other, its
    chunks riding in A's mixed plans. Each plan is a step of A and a chunk of B: the clock
    gains no less than A's tokens (it counted half a step a plan before)."""
    config = EngineConfig(
        kv_block_size_tokens=4,
        num_micro_batches=2,
        max_tokens_per_step=8,
        policy=PolicyConfig(EnginePolicy.MEMORY_AWARE, backfill=True),
    )
    scheduler = StepScheduler(config, llama_config, BlockAllocator(400))

    _enqueue(scheduler, "A", 4, 100)
    for _ in range(3):
        _run_step(scheduler)
    a = scheduler._running[0]
    tokens, clock = len(a.output_token_ids), scheduler._clock()
    _enqueue(scheduler, "B", 120, 100)
    kinds = {_run_step(scheduler).kind for _ in range(10)}
    assert StepKind.MIXED in kinds
    assert {s.group for s in scheduler._running} == {0, 1}  # B has a group of its own
    assert scheduler._clock() - clock >= len(a.output_token_ids) - tokens
