"""The simulated engine policies: fcfs vs memory_aware preemptions under a KV budget."""

from __future__ import annotations

import random

import pytest

from services.scheduler.simulator.kv_policy import SimRequest, simulate_kv_policy


def test_fcfs_preempts_where_memory_aware_waits_against_a_hand_computed_budget() -> None:
    # Blocks of one token: a sequence holds prompt + generated - 1 blocks. 10 blocks, so the
    # watermark is 1. A and B: 2-token prompts, 6 tokens out.
    #   fcfs admits both (2 blocks each); after four decodes each holds 5 blocks and the cache
    #   is full, so A's next token preempts B (the newest). A finishes at 7 blocks; B is
    #   prefilled again with its prompt + 4 tokens (6 recomputed) and finishes alone.
    #   memory_aware (nothing learned yet: both predicted to reach max_tokens = 6) keeps B
    #   waiting while A has generated k < 5 tokens: the predicted peak, when A ends, is
    #   7 (B's end) + 7 - k (A's end) = 14 - k > 9 = 10 - watermark. At k = 5 it is 9: B is
    #   admitted as A takes its last token (peak 7 + 2 = 9 blocks used) and never preempted.
    requests = [SimRequest(2, 6, 6), SimRequest(2, 6, 6)]
    fcfs = simulate_kv_policy(requests, "fcfs", num_blocks=10, block_size_tokens=1)
    assert (fcfs.num_preemptions, fcfs.num_recomputed_tokens, fcfs.num_steps) == (1, 6, 8)
    assert fcfs.peak_blocks_used == 10
    aware = simulate_kv_policy(requests, "memory_aware", num_blocks=10, block_size_tokens=1)
    assert (aware.num_preemptions, aware.num_recomputed_tokens) == (0, 0)
    assert aware.peak_blocks_used == 9 and aware.num_steps == 11


def test_memory_aware_preempts_at_least_ten_times_less_under_a_tight_budget() -> None:
    rng = random.Random(0)
    requests = [
        SimRequest(
            rng.randint(16, 128), rng.choice([rng.randint(4, 40), rng.randint(100, 250)]), 256
        )
        for _ in range(200)
    ]
    fcfs = simulate_kv_policy(requests, "fcfs", num_blocks=60, max_batch_size=32)
    aware = simulate_kv_policy(requests, "memory_aware", num_blocks=60, max_batch_size=32)
    assert fcfs.num_preemptions >= 50
    assert aware.num_preemptions * 10 <= fcfs.num_preemptions
    # Without preemptions there is nothing to recompute, but fewer sequences run at once.
    assert aware.num_recomputed_tokens * 10 <= fcfs.num_recomputed_tokens
    assert aware.num_steps > fcfs.num_steps


def test_a_roomy_cache_never_preempts() -> None:
    requests = [SimRequest(8, 8, 16, arrival_step=i) for i in range(20)]
    for policy in ("fcfs", "memory_aware"):
        assert simulate_kv_policy(requests, policy, num_blocks=1000).num_preemptions == 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate_kv_policy([SimRequest(2, 2, 2)], "sjf", num_blocks=10)
    with pytest.raises(ValueError, match="more than the cache"):
        simulate_kv_policy([SimRequest(200, 2, 64)], "fcfs", num_blocks=4)
    with pytest.raises(ValueError, match="output_tokens"):
        simulate_kv_policy([SimRequest(2, 9, 4)], "fcfs", num_blocks=10)


def test_memory_aware_backfills_a_short_request_past_a_head_that_does_not_fit() -> None:
    # Blocks of one token, 11 blocks (watermark 1: budget 10). A (prompt 2, 6 out) starts
    # alone; H (prompt 6, 2 out) would hold 7 blocks beside A's 4 two steps on: 11 > 10, and
    # A holds more every step, so H is predicted to fit only once A ends, 5 steps on. S
    # (prompt 1, 4 out) fits beside A (6 + 4 = 10 at its end) and ends within those 5 steps.
    # With backfill S runs beside A from step 0 and is done when H starts at step 6 (H ends
    # at step 7: 8 steps); without, S waits for H and runs steps 6-9 (10 steps).
    requests = [SimRequest(2, 6, 6), SimRequest(6, 2, 2), SimRequest(1, 4, 4)]
    runs = {
        backfill: simulate_kv_policy(
            requests, "memory_aware", num_blocks=11, block_size_tokens=1, backfill=backfill
        )
        for backfill in (True, False)
    }
    assert (runs[True].num_steps, runs[False].num_steps) == (8, 10)
    assert runs[True].num_preemptions == runs[False].num_preemptions == 0


def _stream_behind_a_large_head(steps: int) -> list[SimRequest]:
    """8 primers teach outputs of 4; from step 40 two short requests (prompt 2, 4 out,
    max_tokens 40) arrive a step, one in 30 generating 30 (it outlives its prediction and is
    predicted again, further out); at step 60 a head H (prompt 92, 2 out) arrives, which
    fits in 100 one-token blocks only once nearly everything else is done. H is index 8."""
    requests = [SimRequest(2, 4, 40, 0) for _ in range(8)]
    requests.append(SimRequest(92, 2, 2, 60))
    for i in range(2 * steps):
        requests.append(SimRequest(2, 30 if (i + 1) % 30 == 0 else 4, 40, 40 + i // 2))
    return requests


@pytest.mark.parametrize("steps", [200, 800])
def test_backfill_never_starves_the_head_however_long_the_stream(steps: int) -> None:
    # The head's deadline is fixed when it first blocks (never moved out by a running
    # sequence predicted again): backfill stops at it, and H starts once the sequences
    # admitted by then are done, each within its max_tokens (40) of the deadline. A window
    # recomputed each round kept admitting the stream: H waited the whole stream.
    waits = {
        backfill: simulate_kv_policy(
            _stream_behind_a_large_head(steps),
            "memory_aware",
            num_blocks=100,
            block_size_tokens=1,
            backfill=backfill,
        ).first_admitted_steps[8]
        - 60
        for backfill in (True, False)
    }
    assert waits[False] <= 30  # strict order
    assert waits[True] <= waits[False] + 40
