"""The queue's load is kept as requests come and go: a load push does not walk the queue."""

from __future__ import annotations

import random

from exegpt.generation import SamplingParams
from exegpt.models.defaults import default_model_config
from exegpt.models.kv_cache import BlockAllocator
from exegpt.output_lengths import OutputLengthModel
from services.worker.config import EngineConfig
from services.worker.requests import EngineRequest
from services.worker.step_scheduler import StepScheduler

MAX_TOKENS = (16, 32, 64, 128)


class _CountingLengths(OutputLengthModel):
    """The real length model, counting its estimates."""

    def __init__(self) -> None:
        super().__init__()
        self.estimates = 0

    def expected_total(self, num_generated: int, max_tokens: int) -> float | None:
        self.estimates += 1
        return super().expected_total(num_generated, max_tokens)


def _request(i: int) -> EngineRequest:
    sampling = SamplingParams(max_tokens=MAX_TOKENS[i % 4], ignore_eos=True)
    return EngineRequest(f"r{i}", [5] * (i % 50 + 1), sampling, lambda event: None)


def _walked(requests: list[EngineRequest], scheduler: StepScheduler) -> tuple[int, int, int]:
    """The load as a walk of every queued and running request computes it."""
    expected = scheduler.lengths.expected_remaining
    running = [s.load() for s in scheduler._running]
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    decode = sum(expected(0, r.sampling.max_tokens) for r in requests)
    decode += sum(expected(x.num_generated, x.max_tokens) for x in running)
    prefill_left = sum(s.prefill_left for s in scheduler._running if not s.prefilled)
    return len(requests), prompt + prefill_left, round(decode)


def test_a_snapshot_of_2000_waiting_prices_each_max_tokens_once_and_matches_a_walk() -> None:
    config = EngineConfig(max_batch_size=8, kv_block_size_tokens=4)
    scheduler = StepScheduler(config, default_model_config(), BlockAllocator(4096))
    lengths = _CountingLengths()
    scheduler.lengths = lengths
    for length in (3, 9, 20, 40, 70, 100, 120, 12, 30, 50):
        lengths.observe(length)
    requests = [_request(i) for i in range(2000)]
    for request in requests:
        scheduler.enqueue(request)
    for request in requests[100:200]:
        scheduler.request_abort(request.request_id)
    scheduler.apply_aborts()
    assert scheduler.next_plan() is not None  # admits the first 8 and plans their prefill
    admitted = {s.request.request_id for s in scheduler._running}
    assert len(admitted) == 8
    waiting = [r for r in requests[:100] + requests[200:] if r.request_id not in admitted]
    lengths.estimates = 0
    snapshot = scheduler.snapshot()
    assert lengths.estimates <= len(MAX_TOKENS) + 8  # per distinct max_tokens, per running
    walked = _walked(waiting, scheduler)
    assert (
        snapshot.num_waiting,
        snapshot.num_pending_prefill_tokens,
        snapshot.num_remaining_decode_tokens,
    ) == walked
    scheduler.fail_all("stopping")
    empty = scheduler.snapshot()
    assert (empty.num_waiting, empty.num_pending_prefill_tokens) == (0, 0)
    assert empty.num_remaining_decode_tokens == 0


def test_the_expected_output_is_the_mean_of_the_lengths_seen_beyond_the_generated() -> None:
    lengths = OutputLengthModel(window=16, min_samples=3)
    draw = random.Random(7)
    seen: list[int] = []
    for _ in range(60):  # past the window: the oldest lengths leave it
        length = draw.randint(1, 80)
        lengths.observe(length)
        seen = (seen + [length])[-16:]
        for generated in (0, 5, 20, 40, 79):
            tail = [n for n in seen if n > generated]
            mean = None if len(tail) < 3 else min(64, sum(tail) / len(tail))
            assert lengths.expected_total(generated, 64) == mean
