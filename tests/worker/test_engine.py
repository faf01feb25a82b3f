"""The engine on the real default model: batching modes, early exit, KV accounting, limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from exegpt.generation import FinishReason, InvalidRequestError, SamplingParams
from exegpt.models.loader import LoadedModel, load_model
from exegpt.schedule import ScheduleKind
from services.worker.config import EngineConfig
from services.worker.engine import (
    Engine,
    EngineEvent,
    EngineRequest,
    EngineStoppedError,
    QueueFullError,
)
from services.worker.server import build_engine


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model("exegpt-tiny-t5")


@dataclass
class Collector:
    """Receives a request's events on the engine thread and signals its finish."""

    events: list[EngineEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        if event.finish_reason is not None or event.error is not None:
            self.done.set()

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    def wait(self) -> Collector:
        assert self.done.wait(60), "request did not finish"
        return self


def submit(engine: Engine, prompt: list[int], request_id: str = "r", **sampling) -> Collector:
    collector = Collector()
    engine.submit(EngineRequest(request_id, prompt, SamplingParams(**sampling), collector))
    return collector


def run_all_queued(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of every prompt, all queued before the engine starts (so the batches do
    not depend on when the engine thread wakes); stops the engine."""
    collectors = [
        submit(engine, p, f"r{i}", max_tokens=max_tokens, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    engine.start()
    try:
        return [collector.wait().token_ids for collector in collectors]
    finally:
        engine.stop()


@pytest.fixture()
def engine_factory(loaded: LoadedModel) -> Iterator:
    engines: list[Engine] = []

    def make(**options) -> Engine:
        engine = build_engine(loaded, EngineConfig(**options))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def test_forced_length_and_kv_freed_after_finish(engine_factory) -> None:
    engine = engine_factory()
    collector = submit(engine, [3, 4, 5], max_tokens=9, ignore_eos=True).wait()
    assert len(collector.token_ids) == 9
    assert collector.events[-1].finish_reason is FinishReason.LENGTH
    timings = collector.events[-1].timings
    assert timings is not None
    assert (
        timings.arrival_ns <= timings.admitted_ns <= timings.prefill_end_ns <= timings.finished_ns
    )
    stats = engine.stats()
    assert stats.kv_used_bytes == 0 and stats.num_running == 0 and stats.num_finished == 1


def test_eos_stops_unless_ignored(engine_factory, loaded: LoadedModel) -> None:
    engine = engine_factory()
    # Find a prompt whose greedy continuation emits EOS, by trying a few.
    eos = loaded.config.eos_token_id
    for start in range(3, 120):
        tokens = submit(engine, [start, start + 1], max_tokens=40).wait().token_ids
        if tokens[-1] == eos:
            forced = submit(engine, [start, start + 1], max_tokens=40, ignore_eos=True).wait()
            assert len(forced.token_ids) == 40
            assert forced.token_ids[: len(tokens) - 1] == tokens[:-1]
            return
    # The embedded model's weights are seeded: some prompt ends in EOS, or the search is broken.
    pytest.fail("no prompt produced EOS: the EOS check has nothing to test")


def test_batched_requests_equal_individual_runs(engine_factory) -> None:
    engine = engine_factory(max_batch_size=8)
    prompts = [[3 + i] * (2 + 5 * i) for i in range(5)]
    alone = [submit(engine, p, max_tokens=6, ignore_eos=True).wait().token_ids for p in prompts]
    together = [
        submit(engine, p, f"r{i}", max_tokens=6, ignore_eos=True) for i, p in enumerate(prompts)
    ]
    assert [c.wait().token_ids for c in together] == alone


def test_continuous_batching_admits_while_others_run(engine_factory) -> None:
    engine = engine_factory(max_batch_size=4)
    long = submit(engine, [3, 4], "long", max_tokens=60, ignore_eos=True)
    short = submit(engine, [5, 6], "short", max_tokens=3, ignore_eos=True)
    short.wait()
    long.wait()
    # The short request joined the running batch and left before the long one finished.
    assert short.events[-1].timings.finished_ns < long.events[-1].timings.finished_ns


def test_static_batching_waits_for_the_whole_batch(engine_factory) -> None:
    engine = engine_factory(batching=ScheduleKind.STATIC, max_batch_size=2)
    first = [
        submit(engine, [3, 4], f"a{i}", max_tokens=n, ignore_eos=True)
        for i, n in enumerate((3, 30))
    ]
    late = submit(engine, [5, 6], "late", max_tokens=2, ignore_eos=True)
    for collector in [*first, late]:
        collector.wait()
    batch_end = max(c.events[-1].timings.finished_ns for c in first)
    # Early finishers leave at once, but nobody is admitted until the batch has drained.
    assert first[0].events[-1].timings.finished_ns < batch_end
    assert late.events[-1].timings.admitted_ns >= batch_end


def test_request_that_can_never_fit_is_rejected(engine_factory) -> None:
    engine = engine_factory(kv_capacity_bytes=300 * 1024, kv_block_size_tokens=16)
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        submit(engine, list(range(3, 203)), max_tokens=500)
    assert len(submit(engine, [3, 4], max_tokens=2).wait().token_ids) == 2


def test_context_and_vocabulary_limits(engine_factory) -> None:
    engine = engine_factory()
    with pytest.raises(InvalidRequestError, match="context"):
        submit(engine, [3] * 1000, max_tokens=100)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        submit(engine, [3, 384], max_tokens=1)
    with pytest.raises(InvalidRequestError, match="empty"):
        submit(engine, [], max_tokens=1)


def test_bounded_queue_refuses_with_queue_full(engine_factory) -> None:
    engine = engine_factory(max_batch_size=1, max_queue_size=2)
    running = submit(engine, [3], "run", max_tokens=200, ignore_eos=True)
    queued = []
    with pytest.raises(QueueFullError):
        for i in range(10):
            queued.append(submit(engine, [3], f"q{i}", max_tokens=1))
    assert 1 <= len(queued) <= 3
    engine.abort("run")
    for collector in queued:
        collector.wait()
    # An aborted request gets no further events: its client has gone.
    assert not running.done.is_set()


def test_abort_frees_kv_of_running_and_waiting_requests(engine_factory) -> None:
    engine = engine_factory(max_batch_size=1)
    running = submit(engine, [3, 4], "run", max_tokens=500, ignore_eos=True)
    submit(engine, [3, 4], "wait", max_tokens=500, ignore_eos=True)
    while not running.events:
        threading.Event().wait(0.01)
    assert engine.stats().kv_used_bytes > 0
    engine.abort("run")
    engine.abort("wait")
    for _ in range(500):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.kv_used_bytes == 0:
            break
        threading.Event().wait(0.01)
    assert stats.kv_used_bytes == 0 and stats.num_aborted == 2
    assert len(submit(engine, [3], max_tokens=2).wait().token_ids) == 2


def test_stop_fails_queued_requests_instead_of_dropping_them(engine_factory) -> None:
    engine = engine_factory(max_batch_size=1)
    collectors = [submit(engine, [3], f"r{i}", max_tokens=300, ignore_eos=True) for i in range(3)]
    engine.stop()  # long before the running request's 300 tokens
    for collector in collectors:
        last = collector.wait().events[-1]
        assert last.finish_reason is None and last.error == "engine is shutting down"
    # One request fits the batch: the two queued behind it never produced a token.
    assert [collector.token_ids for collector in collectors[1:]] == [[], []]


def test_a_tiny_temperature_is_served_beside_others(engine_factory) -> None:
    engine = engine_factory(max_batch_size=4)
    normal = submit(engine, [3, 4, 5], "normal", max_tokens=6, ignore_eos=True)
    poison = submit(engine, [6, 7], "poison", max_tokens=4, temperature=1e-40, ignore_eos=True)
    assert len(normal.wait().token_ids) == 6 and normal.events[-1].error is None
    assert len(poison.wait().token_ids) == 4 and poison.events[-1].error is None


def test_a_request_that_breaks_the_model_fails_alone() -> None:
    loaded = load_model("exegpt-tiny-t5")
    model = loaded.model
    engine = build_engine(loaded, EngineConfig(max_batch_size=4))
    engine.start()
    try:
        expected = submit(engine, [3, 4, 5], max_tokens=8, ignore_eos=True).wait().token_ids
        bad_token = next(t for t in range(10, 384) if t not in expected)
        with torch.no_grad():  # untie the head, then corrupt one input row of the checkpoint
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone(), False)
            model.embed.weight[bad_token] = float("nan")
        healthy = submit(engine, [3, 4, 5], "healthy", max_tokens=8, ignore_eos=True)
        broken = submit(engine, [bad_token, 4], "broken", max_tokens=8, ignore_eos=True)
        assert "non-finite" in (broken.wait().events[-1].error or "")
        assert healthy.wait().token_ids == expected and healthy.events[-1].error is None
        assert engine.stats().kv_used_bytes == 0
    finally:
        engine.stop()


def test_events_carry_the_wait_from_arrival_to_first_admission(engine_factory) -> None:
    engine = engine_factory(max_batch_size=1)
    collectors = [Collector(), Collector()]
    requests = [
        EngineRequest(f"q{i}", [3, 4], SamplingParams(max_tokens=6, ignore_eos=True), c)
        for i, c in enumerate(collectors)
    ]
    for request in requests:
        engine.submit(request)
    first, second = (c.wait() for c in collectors)
    for collector in (first, second):
        waits = {e.queue_s for e in collector.events}
        assert len(waits) == 1  # every token event carries the same first admission
        # Admitted before its first token was sampled.
        assert 0 < waits.pop() < collector.events[0].token_times_s[0]
    # With one slot the second request is admitted only after the first one's last token.
    first_done_s = requests[0].arrival_s + first.events[-1].token_times_s[-1]
    assert requests[1].arrival_s + second.events[0].queue_s > first_done_s


def test_a_defect_in_the_engine_loop_fails_its_requests_instead_of_hanging(
    engine_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the step scheduler raise (a defect, here forced), the requests waiting get an
    error marked unavailable, the replica reports itself unhealthy and refuses new ones."""
    engine = engine_factory()  # started, idle

    def broken() -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(engine._scheduler, "next_plan", broken)
    waiting = submit(engine, [5, 6, 7], "a", max_tokens=4)
    assert waiting.done.wait(10)
    assert waiting.events[-1].error and waiting.events[-1].unavailable
    assert "engine failed (RuntimeError)" in waiting.events[-1].error
    assert not engine.healthy()
    with pytest.raises(EngineStoppedError):
        submit(engine, [5, 6, 7], "b", max_tokens=4)
