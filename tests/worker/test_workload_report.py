"""What a replica reports to the scheduler, and which pushed placement it takes: a real
engine's observations become reports the scheduler's own conversion and core accept; step
times map onto the stages of pipelined placements; reports keep to the item limit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
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
from services.worker.executor.pipeline_config import PipelineConfig
from services.worker.observations import Observations, StepTime
from services.worker.schedule_board import Finish, p99_length_latency
from services.worker.schedule_link import placement_to_apply
from services.worker.server import build_engine, build_pipeline_engine
from services.worker.workload_report import (
    DECODE,
    ENCODE,
    OVERHEAD,
    TRANSFER,
    build_reports,
    stage_times,
)
from tests.worker.stages import StagePool
from tests.worker.test_engine import submit

T5 = default_model_config()


def _stage(enc: tuple[int, int], dec: tuple[int, int], tp: int = 1, **kw) -> StagePlacement:
    return StagePlacement(LayerRange(*enc), LayerRange(*dec), tp, **kw)


def test_a_real_engines_observations_are_a_report_the_scheduler_takes(
    tmp_path: Path, measured_tiny_profile: Path
) -> None:
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
    by_kind = {k: [t for t in report.stage_times if t.stage == k] for k in (ENCODE, DECODE)}
    assert by_kind[ENCODE] and by_kind[DECODE]
    assert all(t.num_layers == 4 and t.tp_degree == 1 for k in by_kind for t in by_kind[k])
    # In process: no hand-offs, and each decode step's host time beyond its forward.
    overheads = [t for t in report.stage_times if t.stage == OVERHEAD]
    assert not [t for t in report.stage_times if t.stage == TRANSFER]
    assert [t.batch_size for t in overheads] == [t.batch_size for t in by_kind[DECODE]]
    assert all(t.measured_s > 0 for t in overheads)

    # A profile whose serving section prices a decode step's host work: the overhead
    # observations are judged against it (the measured tiny profile, with terms added).
    profile = json.loads(measured_tiny_profile.read_text())
    profile["serving"] = {
        "step_s": 1e-3, "token_s": 1e-4, "request_s": 0.0, "num_steps": 1,
        "busy_fraction": 0.5, "method": "hand-made",
    }  # fmt: skip
    served_profile = tmp_path / "served.json"
    served_profile.write_text(json.dumps(profile))
    model_dir = save_default_model(tmp_path / "model")
    config = SchedulerConfig(profile=str(served_profile), model_config=str(model_dir))

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
    assert len(windows.stage_ratios[StageKind.OVERHEAD]) == len(overheads)


def test_a_pipelines_handoffs_are_reported_as_transfers(
    four_layer_models, stage_pool: StagePool
) -> None:
    path: Path = four_layer_models["llama-gqa"][0]
    loaded = load_model(str(path))
    placement = Placement((_stage((0, 0), (0, 2)), _stage((0, 0), (2, 4))))
    pipeline = PipelineConfig(
        model=str(path),
        dtype="float32",
        placement=placement,
        stage_addresses=stage_pool.addresses([1, 1]),
        num_blocks=64,
        block_size_tokens=4,
    )
    config = EngineConfig(max_batch_size=4, kv_block_size_tokens=4)
    engine = build_pipeline_engine(loaded, config, pipeline)
    engine.start()
    try:
        collectors = [
            submit(engine, list(range(5, 9 + i)), f"r{i}", max_tokens=4, ignore_eos=True)
            for i in range(3)
        ]
        for collector in collectors:
            collector.wait()
            assert collector.events[-1].error is None
        observations = engine.drain_observations()
    finally:
        engine.stop()
    # One step in flight at a time: the second stage is idle when each hand-off is sent,
    # so every step's one hop is measured: a prefill's prompt tokens, a decode's one a row.
    steps = observations.step_times
    assert len(observations.handoffs) == len(steps) >= 2
    for step, handoff in zip(steps, observations.handoffs, strict=True):
        assert handoff.batch_size == step.batch_size and handoff.measured_s > 0
        if step.is_decode:
            assert handoff.num_tokens == step.batch_size
        else:
            assert handoff.num_tokens >= step.num_tokens
    assert not observations.host_times  # over stages the forward is not measured apart
    (report,) = build_reports(observations, placement, loaded.config, replica_id="w",
                              max_items=8192)  # fmt: skip
    transfers = [t for t in report.stage_times if t.stage == TRANSFER]
    assert [(t.batch_size, t.num_tokens) for t in transfers] == [
        (h.batch_size, h.num_tokens) for h in observations.handoffs
    ]


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
    # A stage's encode time holds only its encoder layers: the decoder's first step is a
    # pass of its own, not reported.
    assert {t.num_first_step_layers for t in stage_times(prefill, rra, T5)} == {0}
    assert encode.num_first_step_layers == 0
    # In process, the one forward also ran every decoder layer's first step.
    (whole,) = stage_times(StepTime(False, 2, 40, 0, (0.3,)), None, T5)
    assert (whole.stage, whole.num_layers, whole.num_first_step_layers) == (ENCODE, 4, 4)
    (whole_decode,) = stage_times(StepTime(True, 2, 30, 40, (0.01,)), None, T5)
    assert (whole_decode.num_layers, whole_decode.num_first_step_layers) == (4, 0)
    report = scheduler_pb2.WorkloadReport(stage_times=[whole, whole_decode])
    taken = convert.observations_from_proto(report, max_items=10).stage_times
    assert [t.num_first_step_layers for t in taken] == [4, 0]

    llama = dataclasses.replace(T5, family="llama", num_encoder_layers=0, ffn="swiglu")
    split = Placement(
        (_stage((0, 0), (0, 4), role="prefill"), _stage((0, 0), (0, 4), role="decode"))
    )
    (prefill_only,) = stage_times(StepTime(False, 1, 9, 0, (0.3, 0.05)), split, llama)
    assert (prefill_only.stage, prefill_only.num_layers) == (ENCODE, 4)
    (in_process,) = stage_times(StepTime(False, 1, 9, 0, (0.3,)), None, llama)
    assert (in_process.num_layers, in_process.num_first_step_layers) == (4, 0)


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
    # Two reached the p99 length (99): too few alone, the line through all is read there.
    assert p99_length_latency(finishes) == (pytest.approx(9.9), 99)
    finishes += [Finish(0.0, 100, 12.0)] * 2
    assert p99_length_latency(finishes) == (pytest.approx(34.0 / 3), 100)
