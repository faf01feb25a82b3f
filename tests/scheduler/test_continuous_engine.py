"""The continuous-batching model's steady state (simulator/continuous.py) against the real
engine: how many prefill steps it runs per decode step, how many sequences each admits, and
how many decode steps a sequence takes. Counts from the engine clock, not timings."""

from __future__ import annotations

import time

import numpy as np
import pytest

from exegpt.generation import SamplingParams
from exegpt.models.loader import load_model
from services.scheduler.problem import WorkloadDistribution
from services.scheduler.simulator.common import LayerCosts, WorkloadStats
from services.scheduler.simulator.continuous import steady_state
from services.worker.config import EngineConfig
from services.worker.engine import Engine, EngineRequest
from services.worker.engine_clock import StepTotals
from services.worker.server import build_engine
from tests.scheduler.toy_cost import ToyCostModel, decoder_only_shape, pmf
from tests.worker.test_engine import Collector

BATCH = 8
NUM_REQUESTS = 160
OUTPUT_PMF = {4: 0.25, 6: 0.25, 10: 0.25, 12: 0.25}  # mean 8: a sequence decodes 7 steps


def totals_when(engine: Engine, num_finished: int) -> dict[str, StepTotals]:
    """The engine clock's totals by kind once `num_finished` requests have finished."""
    deadline_s = time.monotonic() + 60
    while engine.stats().num_finished < num_finished:
        assert time.monotonic() < deadline_s, "the engine stopped finishing requests"
        time.sleep(0.002)
    return {t.kind: t for t in engine.stats().step_totals}


def between(start: StepTotals, end: StepTotals) -> StepTotals:
    return StepTotals(
        end.kind,
        end.num_steps - start.num_steps,
        end.num_rows - start.num_rows,
        end.forward_s - start.forward_s,
        end.host_s - start.host_s,
    )


def test_the_engine_prefills_as_the_model_counts() -> None:
    rng = np.random.default_rng(7)
    lengths = rng.choice(list(OUTPUT_PMF), size=NUM_REQUESTS, p=list(OUTPUT_PMF.values()))
    engine = build_engine(load_model("exegpt-tiny-t5"), EngineConfig(max_batch_size=BATCH))
    engine.start()
    try:
        collectors = []
        for index, length in enumerate(lengths):
            collector = Collector()
            sampling = SamplingParams(max_tokens=int(length), ignore_eos=True)
            engine.submit(EngineRequest(f"r{index}", [3, 4, 5, 6], sampling, collector))
            collectors.append(collector)
        start = totals_when(engine, NUM_REQUESTS // 5)  # the batch is full and mixed
        end = totals_when(engine, 4 * NUM_REQUESTS // 5)  # before it drains
        for collector in collectors:
            collector.wait()
        whole = totals_when(engine, NUM_REQUESTS)
    finally:
        engine.stop()
    # Each sequence's first token comes with its prefill: it decodes its length - 1 steps.
    assert whole["prefill"].num_rows == NUM_REQUESTS
    assert whole["decode"].num_rows == int(lengths.sum()) - NUM_REQUESTS
    prefill, decode = (between(start[kind], end[kind]) for kind in ("prefill", "decode"))

    workload = WorkloadDistribution("steps", pmf({4: 1.0}), pmf(OUTPUT_PMF))
    costs = LayerCosts(ToyCostModel(decoder_only_shape()), WorkloadStats.from_workload(workload))
    steady = steady_state(costs, BATCH, 1)
    assert steady.decode_steps == pytest.approx(7.0)
    # Between the fill and the drain of the burst, every decode step holds the full batch;
    # the prefills follow the model within the sampling noise of 160 requests.
    assert decode.num_rows == BATCH * decode.num_steps
    prefills_per_decode = prefill.num_steps / decode.num_steps
    assert prefills_per_decode == pytest.approx(steady.prefills, rel=0.1)
    # 1 - (6/7)^8 = 0.71 prefills per decode step of 1.61 sequences each, where one prefill
    # of ceil(8 / 8) = 1 sequence per step would be far off both.
    assert prefill.num_rows / prefill.num_steps == pytest.approx(steady.prefill_rows, rel=0.1)
