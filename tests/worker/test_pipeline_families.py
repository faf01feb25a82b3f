"""Qwen2 (q/k/v biases split with their rows) and Mistral (sliding window) over two real stage
processes, the first tensor-parallel over two ranks: the same tokens as transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from exegpt.models.loader import load_model
from services.worker.config import EngineConfig
from services.worker.executor.pipeline_config import PipelineConfig
from services.worker.server import build_engine, build_pipeline_engine
from tests.models.conftest import build_family_hf
from tests.worker.stages import StagePool
from tests.worker.test_pipeline import PROMPTS, _reference, _run, topologies


@pytest.mark.parametrize("variant", ["qwen2", "mistral-window"])
def test_family_over_two_stages_with_tp2_equals_transformers(
    variant: str, model_root: Path, stage_pool: StagePool
) -> None:
    hf_model = build_family_hf(variant, num_layers=4, seed=4321)
    path = model_root / f"{variant}-4-layers"
    hf_model.save_pretrained(path, safe_serialization=True)
    expected = _reference(hf_model, is_t5=False)
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)
    loaded = load_model(str(path))
    assert _run(build_engine(loaded, EngineConfig(max_batch_size=8)), PROMPTS) == expected
    placement, layout = topologies(False)["tp2-beside-tp1"]
    assert layout == [2, 1]
    pipeline = PipelineConfig(
        model=str(path),
        dtype="float32",
        placement=placement,
        stage_addresses=stage_pool.addresses(layout),
        num_blocks=64,
        block_size_tokens=4,
    )
    config = EngineConfig(max_batch_size=8, num_micro_batches=2, kv_block_size_tokens=4)
    assert _run(build_pipeline_engine(loaded, config, pipeline), PROMPTS) == expected
