"""Decode steps built ahead over real stage processes (PP 2, T5): each sent decode step's
successor is built in the engine's wait for results, after the grace, never inside the
submit that sends the step; every micro-batch keeps its prediction however many the schedule
runs; and the tokens stay those of the single-process engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from exegpt.models.defaults import default_model_config
from exegpt.models.loader import LoadedModel, load_model
from exegpt.placement import Placement
from services.worker.config import EngineConfig
from services.worker.executor.ahead import DecodeAhead
from services.worker.executor.pipeline import PipelineExecutor
from services.worker.executor.pipeline_config import MAX_AHEAD_GRACE_S
from services.worker.metrics import EngineCollector
from services.worker.server import build_engine, build_pipeline_engine
from tests.worker.stages import StagePool
from tests.worker.test_engine import run_all_queued
from tests.worker.test_pipeline import NUM_TOKENS, PROMPTS, _pipeline, topologies


@pytest.fixture(scope="module")
def t5(four_layer_models) -> tuple[LoadedModel, list[list[int]]]:
    """The 4-layer T5 model and its greedy tokens from the single-process engine."""
    loaded = load_model(str(four_layer_models["t5"][0]))
    single = build_engine(loaded, EngineConfig(max_batch_size=8, kv_block_size_tokens=4))
    return loaded, run_all_queued(single, PROMPTS, NUM_TOKENS)


def _ahead_metric(engine) -> dict[str, float]:
    """The engine's scraped decode-ahead counter, by result."""
    return {
        sample.labels["result"]: sample.value
        for family in EngineCollector(engine, "t5").collect()
        if family.name == "exegpt:decode_ahead_steps"
        for sample in family.samples
    }


@pytest.fixture()
def builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Where each decode successor was built: "submit" (inside PipelineExecutor.submit, which
    sends the step) or "wait" (anywhere else: the wait for results); "ready" where a wait left
    it unbuilt because a result was ready first."""
    where: list[str] = []
    inside = [False]
    submit, build_next = PipelineExecutor.submit, DecodeAhead.build_next
    build_ahead = PipelineExecutor._build_ahead

    def traced_build_ahead(self, timeout_ms):
        left = build_ahead(self, timeout_ms)
        if self._ahead.has_deferred:
            where.append("ready")
        return left

    def traced_submit(self, plan):
        inside[0] = True
        try:
            submit(self, plan)
        finally:
            inside[0] = False

    def traced_build_next(self, plan):
        where.append("submit" if inside[0] else "wait")
        build_next(self, plan)

    monkeypatch.setattr(PipelineExecutor, "submit", traced_submit)
    monkeypatch.setattr(DecodeAhead, "build_next", traced_build_next)
    monkeypatch.setattr(PipelineExecutor, "_build_ahead", traced_build_ahead)
    yield where


@pytest.mark.parametrize("grace_s", [0.0, 0.001])
def test_each_decode_successor_is_built_in_the_wait_not_in_the_submit(
    grace_s: float, t5, four_layer_models, stage_pool: StagePool, builds: list[str]
) -> None:
    loaded, expected = t5
    placement, layout = topologies(True)["pp2"]
    pipeline = _pipeline(four_layer_models["t5"][0], placement, stage_pool.addresses(layout))
    # One micro-batch, every prompt queued before the engine starts: one batch throughout,
    # whose decode steps each follow the one before.
    config = EngineConfig(max_batch_size=8, kv_block_size_tokens=4)
    engine = build_pipeline_engine(loaded, config, replace(pipeline, ahead_grace_s=grace_s))
    assert run_all_queued(engine, PROMPTS, NUM_TOKENS) == expected
    # Every decode step's successor, once: built in the wait, or left for its submit when
    # the step's result was ready first (a grace of 0 on a fast stage); never in a submit.
    assert "submit" not in builds
    built, ready_first = builds.count("wait"), builds.count("ready")
    assert built + ready_first == NUM_TOKENS - 1, builds
    hits, misses = engine.stats().decode_ahead
    assert hits + misses == NUM_TOKENS - 1  # the first decode always misses
    # Each build is used, but one made after the last decode (nothing follows it).
    assert hits == built - (builds[-1] == "wait"), builds
    assert _ahead_metric(engine) == {"hit": hits, "miss": misses}


def test_more_micro_batches_than_stages_keep_their_predictions(
    t5, four_layer_models, stage_pool: StagePool
) -> None:
    loaded, expected = t5
    placement, layout = topologies(True)["pp2"]
    pipeline = _pipeline(four_layer_models["t5"][0], placement, stage_pool.addresses(layout))
    config = EngineConfig(max_batch_size=8, num_micro_batches=3, kv_block_size_tokens=4)
    engine = build_pipeline_engine(loaded, config, pipeline)
    assert run_all_queued(engine, PROMPTS, NUM_TOKENS) == expected
    hits, misses = engine.stats().decode_ahead
    assert hits > misses  # each micro-batch misses its first decode step or two at most


@pytest.mark.parametrize("grace_s", [-0.001, MAX_AHEAD_GRACE_S * 2, float("inf"), float("nan")])
def test_an_ahead_grace_out_of_range_is_refused_with_its_value(grace_s: float) -> None:
    pipeline = _pipeline(
        "m", Placement.even(default_model_config(), 2), (("127.0.0.1:1",), ("127.0.0.1:2",))
    )
    with pytest.raises(ValueError, match=f"ahead_grace_s .*{grace_s!r}"):
        replace(pipeline, ahead_grace_s=grace_s)


def test_an_ahead_grace_rounds_up_to_whole_milliseconds() -> None:
    pipeline = _pipeline(
        "m", Placement.even(default_model_config(), 2), (("127.0.0.1:1",), ("127.0.0.1:2",))
    )
    assert pipeline.ahead_grace_ms == 1
    graces = (0, 0.0002, 0.0015, 0.003, 0.1)
    assert [replace(pipeline, ahead_grace_s=s).ahead_grace_ms for s in graces] == [0, 1, 2, 3, 100]
    replace(pipeline, ahead_grace_s=MAX_AHEAD_GRACE_S, step_timeout_s=float("inf"))  # accepted


def test_a_result_already_waiting_is_returned_before_any_successor_is_built(
    t5, four_layer_models, stage_pool: StagePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wait for a result starts only once the result is on the socket: it must come back
    at once, with no successor built before it (building it then would only delay it)."""
    loaded, expected = t5
    placement, layout = topologies(True)["pp2"]
    pipeline = _pipeline(four_layer_models["t5"][0], placement, stage_pool.addresses(layout))
    events: list[str] = []
    next_result, build_next = PipelineExecutor.next_result, DecodeAhead.build_next

    def next_result_once_ready(self, timeout_s):
        if self.num_in_flight and self._results.poll(10_000):  # the result is waiting
            events.append("waiting")
        result = next_result(self, timeout_s)
        if result is not None:
            events.append("result")
        return result

    def traced_build_next(self, plan):
        events.append("build")
        build_next(self, plan)

    monkeypatch.setattr(PipelineExecutor, "next_result", next_result_once_ready)
    monkeypatch.setattr(DecodeAhead, "build_next", traced_build_next)
    config = EngineConfig(max_batch_size=8, kv_block_size_tokens=4)
    engine = build_pipeline_engine(loaded, config, pipeline)
    assert run_all_queued(engine, PROMPTS, NUM_TOKENS) == expected
    waits = "".join(e[0] for e in events).split("w")[1:]  # from each ready result on
    assert len(waits) >= NUM_TOKENS and all(w.startswith("r") for w in waits), events
    # Each decode's successor was noted but, its result being there first, never built: the
    # next plan was built at its submit instead.
    assert "build" not in events
    assert engine.stats().decode_ahead == (0, NUM_TOKENS - 1)
