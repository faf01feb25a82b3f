"""What a replica reports to the scheduler, and which pushed placement it takes: a real
engine's observations become reports the scheduler's own conversion and core accept; step
times map onto the stages of pipelined placements; reports keep to the item limit."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from exegpt.generation import SamplingParams
from exegpt.models.defaults import default_model_config
from exegpt.models.loader import load_model, save_default_model
from exegpt.models.stage_spec import LayerRange
from exegpt.placement import Placement, StagePlacement
from exegpt.v1 import scheduler_pb2
from services.scheduler import convert
from services.scheduler.config import SchedulerConfig
from services.scheduler.observations import StageKind
from services.scheduler.service import SchedulerCore
from services.worker.config import EngineConfig
from services.worker.engine import EngineRequest
from services.worker.observations import Observations, StepTime
from services.worker.schedule_board import Finish, p99_length_latency
from services.worker.schedule_link import placement_to_apply
from services.worker.server import build_engine
from services.worker.workload_report import ENCODE, build_reports, stage_times

T5 = default_model_config()


def _stage(enc: tuple[int, int], dec: tuple[int, int], tp: int = 1, **kw) -> StagePlacement:
    return StagePlacement(LayerRange(*enc), LayerRange(*dec), tp, **kw)


def test_a_real_engines_observations_are_a_report_the_scheduler_takes(tmp_path: Path) -> None:
    engine = build_engine(load_model("exegpt-tiny-t5"), EngineConfig(max_batch_size=4))
    engine.start()
    try:
        done: list[str] = []
        for index in range(6):
            engine.submit(
                EngineRequest(
                    f"r{index}",
                    list(range(3, 13 + index)),
                    SamplingParams(max_tokens=5 + index, ignore_eos=True),
                    lambda event: done.append(event.request_id) if event.finish_reason else None,
                )
            )
        deadline = time.monotonic() + 30
        while len(done) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        observations = engine.drain_observations()
    finally:
        engine.stop()
    assert sorted(observations.output_tokens) == [5, 6, 7, 8, 9, 10]
    (report,) = build_reports(
        observations, None, T5, replica_id="w", max_items=8192, with_stage_times=True
    )
    kinds = {t.stage for t in report.stage_times}
    assert kinds == {scheduler_pb2.STAGE_KIND_ENCODE, scheduler_pb2.STAGE_KIND_DECODE}
    assert all(t.num_layers == 4 and t.tp_degree == 1 for t in report.stage_times)

    model_dir = save_default_model(tmp_path / "model")
    config = SchedulerConfig(profile="analytic:a40", model_config=str(model_dir))

    async def report_to_core() -> SchedulerCore:
        core = SchedulerCore(config)
        await core.start()
        ack = core.report(convert.observations_from_proto(report, max_items=8192))
        assert ack.num_stage_times == len(report.stage_times) and ack.current_version == 1
        return core

    core = asyncio.run(report_to_core())
    windows = core._windows  # the ratios calibration and drift judge
    assert len(windows.outputs) == 6
    assert windows.median_ratio(StageKind.ENCODE) and windows.median_ratio(StageKind.DECODE)


def test_step_times_map_onto_the_stages_they_passed() -> None:
    rra = Placement((_stage((0, 2), (0, 2)), _stage((2, 4), (2, 4), tp=2)))
    prefill = StepTime(False, 2, 40, 0, (0.1, 0.2, 0.3, 0.4))  # encoder pass, then decoder
    observed = stage_times(prefill, rra, T5)
    assert [(t.stage, t.num_layers, t.tp_degree) for t in observed] == [
        (ENCODE, 2, 1),
        (ENCODE, 2, 2),
    ]
    assert [t.measured_s for t in observed] == [0.1, 0.2]
    decode = StepTime(True, 2, 30, 40, (0.01, 0.02))
    observed = stage_times(decode, rra, T5)
    assert [(t.num_layers, t.num_cross_tokens) for t in observed] == [(2, 40), (2, 40)]
    assert stage_times(StepTime(True, 2, 30, 40, (0.01,)), rra, T5) == []  # another layout's

    waa = Placement((_stage((0, 4), (0, 0)), _stage((0, 0), (0, 4))))
    (encode,) = stage_times(StepTime(False, 3, 60, 0, (0.5, 0.1)), waa, T5)
    assert (encode.num_layers, encode.num_tokens, encode.batch_size) == (4, 60, 3)

    llama = dataclasses.replace(T5, family="llama", num_encoder_layers=0, ffn="swiglu")
    split = Placement(
        (_stage((0, 0), (0, 4), role="prefill"), _stage((0, 0), (0, 4), role="decode"))
    )
    (prefill_only,) = stage_times(StepTime(False, 1, 9, 0, (0.3, 0.05)), split, llama)
    assert (prefill_only.stage, prefill_only.num_layers) == (ENCODE, 4)


def test_invalid_items_are_dropped_and_reports_keep_to_the_item_limit() -> None:
    observations = Observations(
        input_tokens=[5] * 7 + [0],
        output_tokens=[3] * 6,
        step_times=[StepTime(True, 2, 2, 0, (0.01,))] * 5
        + [StepTime(True, 2, 1, 0, (0.01,)), StepTime(True, 2, 4, 0, (0.0,))],
    )
    reports = build_reports(observations, None, T5, replica_id="w", max_items=4)
    assert all(
        len(r.input_tokens) + len(r.output_tokens) + len(r.stage_times) <= 4 for r in reports
    )
    assert sum(len(r.input_tokens) for r in reports) == 7  # length 0 dropped
    assert sum(len(r.output_tokens) for r in reports) == 6
    assert sum(len(r.stage_times) for r in reports) == 5  # too few tokens, zero time dropped
    assert len(build_reports(Observations(), None, T5, replica_id="w", max_items=4)) == 1


def test_a_pushed_placement_applies_only_where_it_can_be_loaded() -> None:
    two = Placement((_stage((0, 2), (0, 2)), _stage((2, 4), (2, 4))))
    on_cuda = Placement(tuple(_stage((0, 4), (0, 4), device="cuda:0") for _ in range(2)))
    assert placement_to_apply(two, None)[0] is None  # in process
    assert placement_to_apply(None, on_cuda)[0] is None
    one_tp2 = Placement((_stage((0, 4), (0, 4), tp=2),))
    assert placement_to_apply(one_tp2, two)[0] == one_tp2  # the same two processes, regrouped
    placement, why = placement_to_apply(Placement((_stage((0, 4), (0, 4)),)), two)
    assert placement is None and "needs 1 stage processes" in why
    placement, _ = placement_to_apply(two, on_cuda)
    assert placement is not None and {s.device for s in placement.stages} == {"cuda:0"}
    assert [s.encoder_layers for s in placement.stages] == [LayerRange(0, 2), LayerRange(2, 4)]


def test_p99_length_latency_is_that_of_the_longest_outputs() -> None:
    assert p99_length_latency([]) == (0.0, 0)
    finishes = [Finish(0.0, n, n / 10) for n in range(1, 101)]
    assert p99_length_latency(finishes) == (pytest.approx(9.95), 99)
