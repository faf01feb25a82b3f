"""One replica over real stage processes: greedy tokens equal the single-process engine and
the transformers reference under PP 2, PP 3 (uneven), TP 2, TP 2 beside TP 1, and an
encoding process beside a decoding process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
import zmq

from exegpt.models.loader import LoadedModel, load_model
from exegpt.models.stage_spec import LayerRange
from exegpt.placement import Placement, StagePlacement
from exegpt.schedule import Schedule, ScheduleKind
from exegpt.v1 import stage_pb2, stage_pb2_grpc, transport_pb2
from services.worker.config import EngineConfig
from services.worker.executor.pipeline_config import PipelineConfig
from services.worker.server import build_engine, build_pipeline_engine
from tests.worker.stages import StagePool, StageProcess
from tests.worker.test_engine import run_all_queued, submit

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
NUM_TOKENS = 6


def _pipeline(
    model: object,
    placement: Placement,
    addresses: tuple[tuple[str, ...], ...],
    dtype: str = "float32",
    num_blocks: int = 64,
) -> PipelineConfig:
    """A 4-token-block pipeline over `addresses` (the tests' stage processes)."""
    return PipelineConfig(
        model=str(model),
        dtype=dtype,
        placement=placement,
        stage_addresses=addresses,
        num_blocks=num_blocks,
        block_size_tokens=4,
    )


def _stage(enc: tuple[int, int], dec: tuple[int, int], tp: int = 1) -> StagePlacement:
    return StagePlacement(LayerRange(*enc), LayerRange(*dec), tp)


def topologies(is_t5: bool) -> dict[str, tuple[Placement, list[int]]]:
    enc = (lambda a, b: (a, b)) if is_t5 else (lambda a, b: (0, 0))
    layouts = {
        "pp2": [_stage(enc(0, 2), (0, 2)), _stage(enc(2, 4), (2, 4))],
        "pp3-uneven": [
            _stage(enc(0, 2), (0, 2)),
            _stage(enc(2, 3), (2, 3)),
            _stage(enc(3, 4), (3, 4)),
        ],
        "tp2": [_stage(enc(0, 4), (0, 4), tp=2)],
        "tp2-beside-tp1": [_stage(enc(0, 3), (0, 3), tp=2), _stage(enc(3, 4), (3, 4))],
    }
    if is_t5:
        layouts["encode-beside-decode"] = [_stage((0, 4), (0, 0)), _stage((0, 0), (0, 4))]
    else:  # the prefill group hands each layer's KV to the decode stage that owns it
        layouts["encode-beside-decode"] = [
            replace(_stage((0, 0), (0, 4)), role="prefill"),
            replace(_stage((0, 0), (0, 4)), role="decode"),
        ]
        layouts["prefill-beside-two-decode-stages"] = [
            replace(_stage((0, 0), (0, 4)), role="prefill"),
            replace(_stage((0, 0), (0, 2), tp=2), role="decode"),
            replace(_stage((0, 0), (2, 4)), role="decode"),
        ]
    return {
        name: (Placement(tuple(stages)), [s.tp_degree for s in stages])
        for name, stages in layouts.items()
    }


def _run(engine, prompts: list[list[int]]) -> list[list[int]]:
    engine.start()
    try:
        collectors = [
            submit(engine, p, f"r{i}", max_tokens=NUM_TOKENS, ignore_eos=True)
            for i, p in enumerate(prompts)
        ]
        outputs = []
        for collector in collectors:
            collector.wait()
            assert collector.events[-1].error is None, collector.events[-1].error
            outputs.append(collector.token_ids)
        return outputs
    finally:
        engine.stop()


def _reference(hf_model, is_t5: bool) -> list[list[int]]:
    outputs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            generated = hf_model.generate(
                ids, max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False
            )[0].tolist()
            outputs.append(generated[1:] if is_t5 else generated[len(prompt) :])
    return outputs


CASES = [
    (variant, topology)
    for variant in ("t5", "t5-v1.1", "llama-gqa")
    for topology in topologies(variant != "llama-gqa")
]


@pytest.fixture(scope="module")
def references(four_layer_models) -> dict[str, tuple[LoadedModel, list[list[int]]]]:
    """Per variant: the loaded model, and tokens that transformers and the single-process
    engine agree on."""
    refs = {}
    for variant, (path, hf_model) in four_layer_models.items():
        loaded = load_model(str(path))
        single = _run(build_engine(loaded, EngineConfig(max_batch_size=8)), PROMPTS)
        assert single == _reference(hf_model, variant != "llama-gqa")
        refs[variant] = (loaded, single)
    return refs


@pytest.mark.parametrize(("variant", "topology"), CASES)
def test_pipeline_tokens_equal_the_single_process_engine(
    variant: str, topology: str, references, four_layer_models, stage_pool: StagePool
) -> None:
    loaded, expected = references[variant]
    path: Path = four_layer_models[variant][0]
    placement, layout = topologies(variant != "llama-gqa")[topology]
    pipeline = _pipeline(path, placement, stage_pool.addresses(layout))
    config = EngineConfig(
        max_batch_size=8, num_micro_batches=len(placement.stages), kv_block_size_tokens=4
    )
    engine = build_pipeline_engine(loaded, config, pipeline)
    assert _run(engine, PROMPTS) == expected


def test_a_frame_that_lies_about_its_tensors_is_refused_and_the_stage_serves_on(
    references, four_layer_models, stage_pool: StagePool
) -> None:
    loaded, expected = references["t5"]
    placement, layout = topologies(True)["pp2"]
    addresses = stage_pool.addresses(layout)
    pipeline = _pipeline(four_layer_models["t5"][0], placement, addresses)
    engine = build_pipeline_engine(loaded, EngineConfig(kv_block_size_tokens=4), pipeline)
    with grpc.insecure_channel(addresses[0][0]) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        data_address = stub.Describe(stage_pb2.DescribeStageRequest()).data_address
        before = stub.GetStats(stage_pb2.GetStageStatsRequest()).num_bad_frames
        header = transport_pb2.FrameHeader(kind="decode", attributes={"step_id": "0"})
        header.tensors.add(name="batch.tokens", dtype="int64", shape=[4, 1])
        context = zmq.Context()
        sender = context.socket(zmq.PUSH)
        sender.connect(data_address)
        sender.send_multipart([header.SerializeToString(), b"12 bytes, not 32"])
        sender.send_multipart([b"\xff\xfe not a protobuf header"])
        assert _run(engine, PROMPTS) == expected
        after = stub.GetStats(stage_pb2.GetStageStatsRequest()).num_bad_frames
        sender.close(0)
        context.term()
    assert after - before == 2


PLANNED = {
    "rra": (
        "pp2",
        Schedule(
            ScheduleKind.RRA, encode_batch_size=2, decode_batch_size=4, num_decode_iterations=2
        ),
    ),
    "waa": (
        "encode-beside-decode",
        Schedule(ScheduleKind.WAA_C, encode_batch_size=2, decode_batch_size=4, num_micro_batches=2),
    ),
}


@pytest.mark.parametrize("mode", list(PLANNED))
@pytest.mark.parametrize("variant", ["t5", "llama-gqa"])
def test_planned_schedules_over_stages_give_the_single_process_tokens(
    variant: str, mode: str, references, four_layer_models, stage_pool: StagePool
) -> None:
    loaded, expected = references[variant]
    topology, schedule = PLANNED[mode]
    placement, layout = topologies(variant != "llama-gqa")[topology]
    pipeline = _pipeline(four_layer_models[variant][0], placement, stage_pool.addresses(layout))
    config = EngineConfig(batching=schedule.kind, schedule=schedule, kv_block_size_tokens=4)
    assert _run(build_pipeline_engine(loaded, config, pipeline), PROMPTS) == expected


# Longer prompts than PROMPTS (4-67 tokens): on these, bf16 changes some of both models'
# tokens (7 and 3 of 8 rows), so the test below sees which dtype the stages ran.
BF16_PROMPTS = [[(13 * i + 17 * j + i * j) % 190 + 5 for j in range(4 + 9 * i)] for i in range(8)]
BF16_BLOCKS = 128  # of 4 tokens: every prompt is admitted at the first step


@pytest.mark.parametrize("variant", ["t5", "llama-gqa"])
def test_bf16_pipeline_tokens_equal_the_bf16_single_process_engine(
    variant: str, four_layer_models, stage_pool: StagePool
) -> None:
    path: Path = four_layer_models[variant][0]
    loaded = load_model(str(path), dtype=torch.bfloat16)
    placement, layout = topologies(variant != "llama-gqa")["pp2"]
    # Two micro-batches in both engines and room for every request at once, so each step
    # computes the same rows in both: only the stage boundary differs.
    config = EngineConfig(max_batch_size=8, num_micro_batches=2, kv_block_size_tokens=4)
    expected = run_all_queued(build_engine(loaded, config), BF16_PROMPTS, NUM_TOKENS)
    pipeline = _pipeline(
        path, placement, stage_pool.addresses(layout), dtype="bfloat16", num_blocks=BF16_BLOCKS
    )
    with pytest.raises(ValueError, match="runs bfloat16 but the model card says torch.float32"):
        build_pipeline_engine(load_model(str(path)), config, pipeline)
    engine = build_pipeline_engine(loaded, config, pipeline)
    # The stages hold bf16 KV: the engine's accounting counts 2 bytes an element.
    model = loaded.config
    bytes_per_token = 2 * model.num_kv_layers * model.num_kv_heads * model.head_dim * 2  # K, V
    assert engine.stats().kv_capacity_bytes == BF16_BLOCKS * 4 * bytes_per_token
    assert run_all_queued(engine, BF16_PROMPTS, NUM_TOKENS) == expected
    # bf16 changes some of these tokens: equal tokens mean the stages ran bf16 too.
    float32 = run_all_queued(build_engine(load_model(str(path)), config), BF16_PROMPTS, NUM_TOKENS)
    assert expected != float32


@pytest.mark.parametrize("variant", ["t5", "llama-gqa"])
def test_a_pushed_placement_applies_under_load_and_no_request_fails(
    variant: str, references, four_layer_models, stage_pool: StagePool
) -> None:
    loaded, _ = references[variant]
    is_t5 = variant != "llama-gqa"
    num_tokens = 14
    expected = []
    local = build_engine(loaded, EngineConfig(max_batch_size=8))
    local.start()
    try:
        for i, prompt in enumerate(PROMPTS):
            expected.append(
                submit(local, prompt, f"e{i}", max_tokens=num_tokens, ignore_eos=True)
                .wait()
                .token_ids
            )
    finally:
        local.stop()
    before, layout = topologies(is_t5)["pp2"]
    after, _ = topologies(is_t5)["encode-beside-decode"]
    pipeline = _pipeline(four_layer_models[variant][0], before, stage_pool.addresses(layout))
    # The watchdog asks the stages all the time, so it sees them in the middle of the
    # redeploy's load (empty, or on the new load id before the executor is): it must not
    # take them for restarted stages and reload them under the steps already sent.
    pipeline = replace(pipeline, health_interval_s=0.002)
    engine = build_pipeline_engine(loaded, EngineConfig(kv_block_size_tokens=4), pipeline)
    engine.start()
    try:
        collectors = [
            submit(engine, p, f"r{i}", max_tokens=num_tokens, ignore_eos=True)
            for i, p in enumerate(PROMPTS)
        ]
        while sum(len(c.token_ids) for c in collectors) < 2 * len(PROMPTS):
            time.sleep(0.005)
        schedule = PLANNED["waa"][1]
        engine.apply_schedule(schedule, after)
        outputs = []
        for collector in collectors:
            collector.wait()
            assert collector.events[-1].error is None, collector.events[-1].error
            outputs.append(collector.token_ids)
        assert engine.placement == after and engine.config.schedule == schedule
        assert [s.redeployed for s in engine.switches] == [True]
        assert any(0 < len(c.token_ids) for c in collectors)
    finally:
        engine.stop()
    assert outputs == expected  # nothing dropped, nothing duplicated, same tokens


def test_a_step_is_one_trace_across_the_engine_and_its_stages(tmp_path: Path) -> None:
    from tests.conftest import SPAN_EXPORTER

    ready = tmp_path / "stage.ready"
    log = tmp_path / "stage.log"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "services.worker.stage", "--port", "0",
               "--torch-threads", "1", "--ready-file", str(ready)]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output, env=env)
    try:
        stage = StageProcess(process, ready, log)
        loaded = load_model("exegpt-tiny-t5")
        pipeline = _pipeline(
            "exegpt-tiny-t5", Placement.even(loaded.config, 1), ((stage.wait_ready(),),)
        )
        SPAN_EXPORTER.clear()
        engine = build_pipeline_engine(loaded, EngineConfig(kv_block_size_tokens=4), pipeline)
        _run(engine, [[5, 6, 7]])
        steps = [s for s in SPAN_EXPORTER.get_finished_spans() if s.name.startswith("pipeline.")]
        assert {s.name for s in steps} == {"pipeline.encode", "pipeline.decode"}
        trace_ids = {f"0x{s.context.trace_id:032x}" for s in steps}
    finally:
        process.terminate()
        process.wait(10)
    stage_log = log.read_text()
    # The stage's console exporter printed its spans under the engine's trace ids.
    assert '"name": "stage.encode"' in stage_log and '"name": "stage.decode"' in stage_log
    assert all(f'"trace_id": "{trace_id}"' in stage_log for trace_id in trace_ids)


PENALISED = [
    {"temperature": 0.0, "frequency_penalty": 1.5, "logprobs": 3},
    {"temperature": 0.8, "seed": 11, "presence_penalty": 0.7, "logprobs": 0},
    {"temperature": 0.0},
    {"temperature": 1.2, "seed": 5, "frequency_penalty": -0.5, "presence_penalty": 2.0},
]


def _run_sampled(engine) -> list[tuple[list[int], list]]:
    engine.start()
    try:
        collectors = [
            submit(engine, prompt, f"p{i}", max_tokens=NUM_TOKENS, ignore_eos=True, **fields)
            for i, (prompt, fields) in enumerate(zip(PROMPTS, PENALISED, strict=True))
        ]
        outputs = []
        for collector in collectors:
            collector.wait()
            assert collector.events[-1].error is None, collector.events[-1].error
            logprobs = [lp for e in collector.events for lp in e.logprobs]
            outputs.append((collector.token_ids, logprobs))
        return outputs
    finally:
        engine.stop()


def test_penalties_and_logprobs_at_the_last_stage_equal_the_single_process_engine(
    references, four_layer_models, stage_pool: StagePool
) -> None:
    """Two stages: the rows' generated tokens travel to the last stage, which applies the
    penalties and returns logprobs as tensors; tokens and logprobs equal the in-process run."""
    loaded = references["llama-gqa"][0]
    single = _run_sampled(build_engine(loaded, EngineConfig(max_batch_size=8)))
    placement, layout = topologies(False)["pp2"]
    pipeline = _pipeline(four_layer_models["llama-gqa"][0], placement, stage_pool.addresses(layout))
    config = EngineConfig(max_batch_size=8, num_micro_batches=2, kv_block_size_tokens=4)
    staged = _run_sampled(build_pipeline_engine(loaded, config, pipeline))
    assert [tokens for tokens, _ in staged] == [tokens for tokens, _ in single]
    for (_, expected), (_, actual), fields in zip(single, staged, PENALISED, strict=True):
        assert len(actual) == (NUM_TOKENS if "logprobs" in fields else 0)
        for want, got in zip(expected, actual, strict=True):
            assert got.token_id == want.token_id
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t.token_id for t in got.top] == [t.token_id for t in want.top]
            assert len(got.top) == fields["logprobs"]
