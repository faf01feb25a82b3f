"""Admission reads the waiting queue lazily: under fcfs one admission from 2,000 waiting reads
the one request it admits, and it and an aborted one deep in the queue are taken out by
their ids (no copy, no search), and an RRA
encoding, read lazily, chooses exactly what a full walk of the queue chose."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from exegpt.generation import InvalidRequestError, SamplingParams
from exegpt.models.defaults import default_model_config
from exegpt.models.kv_cache import BlockAllocator
from exegpt.schedule import Schedule, ScheduleKind
from services.worker.config import EngineConfig
from services.worker.modes.rra import RraMode
from services.worker.policies import BasePolicy, EnginePolicy, PolicyConfig, make_policy
from services.worker.requests import EngineRequest
from services.worker.step_scheduler import StepScheduler
from services.worker.waiting_queue import WaitingQueue


class _CountingQueue(WaitingQueue):
    """The real queue, counting the requests its iterators hand out."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __iter__(self) -> Iterator[EngineRequest]:
        for request in super().__iter__():
            self.reads += 1
            yield request


class _ComparedRequest(EngineRequest):
    """A request counting the equality tests made on it (a removal by search makes them)."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        _ComparedRequest.comparisons += 1
        return super().__eq__(other)


def _request(i: int, prompt_tokens: int = 8, max_tokens: int = 16) -> EngineRequest:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return _ComparedRequest(f"r{i}", [5] * prompt_tokens, sampling, lambda event: None)


def test_fcfs_admits_one_of_2000_waiting_reading_only_that_one() -> None:
    config = EngineConfig(max_batch_size=1, kv_block_size_tokens=4)
    scheduler = StepScheduler(config, default_model_config(), BlockAllocator(4096))
    queue = _CountingQueue()
    scheduler._waiting = queue
    for i in range(2000):
        scheduler.enqueue(_request(i))
    _ComparedRequest.comparisons = 0
    plan = scheduler.next_plan()  # admits r0 (the batch holds one) and plans its prefill
    assert plan is not None
    assert [s.request.request_id for s in scheduler._running] == ["r0"]
    assert len(queue) == 1999 and queue.get("r0") is None and queue.get("r1") is not None
    assert queue.prompt_tokens == 1999 * 8
    assert queue.reads == 1  # neither copied nor walked
    # An abort deep in the queue takes the request out by its id, not by a search (a deque's
    # remove would compare it with the 1,499 ahead of it).
    scheduler.request_abort("r1500")
    scheduler.apply_aborts()
    assert queue.get("r1500") is None and len(queue) == 1998
    assert queue.reads == 1 and _ComparedRequest.comparisons == 0


def test_a_queued_request_id_is_refused_and_only_the_queued_object_is_removed() -> None:
    queue = WaitingQueue()
    first = _request(0)
    queue.append(first)
    with pytest.raises(InvalidRequestError, match="already queued"):  # the engine's 4xx kind
        queue.append(_request(0))
    with pytest.raises(ValueError, match="not queued"):
        queue.remove(_request(0))  # an equal request, but not the one queued
    queue.remove(first)
    assert not queue and queue.prompt_tokens == 0


def _walked_choice(
    mode: RraMode, policy: BasePolicy, waiting: list[EngineRequest], limit: int, owed: set[str]
) -> tuple[list[str], set[str], int]:
    """An RRA encoding's choice as a walk of the whole queue in the policy's order makes it:
    (the chosen ids in order, the ids passed over, the chosen prompt tokens)."""
    ordered = list(policy.order(waiting))
    upper = limit * mode.mean_input_tokens * (1 + mode.band)
    chosen = [r for r in ordered if r.request_id in owed][:limit]
    total = sum(len(r.prompt_token_ids) for r in chosen)
    for request in ordered:
        if len(chosen) >= limit:
            break
        tokens = len(request.prompt_token_ids)
        if request not in chosen and (not chosen or total + tokens <= upper):
            chosen.append(request)
            total += tokens
    ids = {r.request_id for r in chosen}
    last = max(i for i, r in enumerate(ordered) if r.request_id in ids)
    passed = {r.request_id for r in ordered[:last] if r.request_id not in ids}
    return [r.request_id for r in ordered if r.request_id in ids], passed, total


@pytest.mark.parametrize("policy_name", [EnginePolicy.FCFS, EnginePolicy.SJF])
def test_rra_reading_lazily_chooses_what_a_walk_of_the_queue_chose(policy_name) -> None:
    schedule = Schedule(
        ScheduleKind.RRA, encode_batch_size=4, decode_batch_size=8, num_decode_iterations=3
    )
    mode = RraMode(schedule, mean_input_tokens=12.0, band=0.2)
    policy = make_policy(PolicyConfig(policy_name, max_wait_s=1e9))
    mode.use_policy(policy)
    rng = random.Random(11)
    queue = WaitingQueue()
    arrivals = iter(range(10**6))
    took_passed_over = owed_past_limit = 0
    for _ in range(200):
        for _ in range(rng.randrange(0, 12)):
            i = next(arrivals)
            queue.append(_request(i, rng.choice([4, 8, 12, 40, 90]), rng.randrange(2, 300)))
        if not queue:
            continue
        limit = rng.randrange(1, 7)
        owed = set(mode._passed_over)
        owed_past_limit += sum(queue.get(i) is not None for i in owed) > limit
        expected = _walked_choice(mode, policy, list(queue), limit, owed)
        chosen = mode.choose(queue, limit)
        assert ([r.request_id for r in chosen], mode._passed_over) == expected[:2]
        assert mode._chosen_tokens == expected[2]
        took_passed_over += mode._took_passed_over
        for request in chosen[: rng.randrange(0, len(chosen) + 1)]:  # some do not fit
            queue.remove(request)
    assert took_passed_over >= 5  # the band passed queries over, and they were owed
    assert owed_past_limit >= 3  # more were owed than an encoding took
