"""Four-layer random checkpoints (T5 both variants, Llama with grouped-query attention) and a
pool of real stage processes shared by the pipeline tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.worker.stages import StagePool

NUM_STAGE_PROCESSES = 4


def _build(variant: str):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(4321)
    if variant == "llama-gqa":
        config = LlamaConfig(
            vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = T5Config(
            vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="relu" if variant == "t5" else "gated-gelu",
            tie_word_embeddings=variant == "t5", decoder_start_token_id=0, dropout_rate=0.0,
        )  # fmt: skip
        model = T5ForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():  # spread the weights so greedy output depends on the prompt
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if "layer_norm" in name:
                    param.copy_(1.0 + 0.1 * noise)
                elif "relative_attention_bias" in name or param.dim() == 1:
                    param.copy_(2.0 * noise)
                elif name in ("shared.weight", "lm_head.weight"):
                    param.copy_(noise)
                else:
                    param.copy_(noise * 2.0 / param.shape[1] ** 0.5)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def four_layer_models(model_root: Path) -> dict[str, tuple[Path, object]]:
    built = {}
    for variant in ("t5", "t5-v1.1", "llama-gqa"):
        model = _build(variant)
        path = model_root / variant
        model.save_pretrained(path, safe_serialization=True)
        built[variant] = (path, model)
    return built


@pytest.fixture(scope="session")
def stage_pool(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[StagePool]:
    pool = StagePool(tmp_path_factory.mktemp("stages"), model_root)
    try:
        pool.start(NUM_STAGE_PROCESSES)
        yield pool
    finally:
        pool.stop()
