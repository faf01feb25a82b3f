"""Tiny random Hugging Face checkpoints (fixed seeds) saved as safetensors, one per variant."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from exegpt.models.loader import LoadedModel, load_model

# Llama-shaped families: Mistral with a sliding window shorter than the longest prompt plus
# its generation, Qwen2 with q/k/v biases (untied and tied head), Llama 3.x RoPE scaling.
FAMILY_VARIANTS = [
    "mistral-window",
    "qwen2",
    "qwen2-tied",
    "llama3-rope",
    "llama-linear-rope",
]
VARIANTS = ["t5", "t5-v1.1", "t5-v1.1-shared-head", "llama", "llama-tied", *FAMILY_VARIANTS]
SLIDING_WINDOW = 8
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # head_dim 16: low, medium and high bands all occur
}


@dataclass
class Checkpoint:
    variant: str
    path: Path
    hf_model: Any  # transformers PreTrainedModel, eval mode
    loaded: LoadedModel


def _t5_config(feed_forward_proj: str, tie_word_embeddings: bool) -> Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=200,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie_word_embeddings,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )


@torch.no_grad()
def _spread_t5_weights(model: nn.Module, seed: int) -> None:
    """Re-draw weights so greedy outputs vary with the prompt (HF's init repeats one token)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name == "decoder.final_layer_norm.weight":
            param.copy_(noise)
        elif "layer_norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif "relative_attention_bias" in name:
            param.copy_(2.0 * noise)
        elif name in ("shared.weight", "lm_head.weight"):
            param.copy_(noise)
        else:
            param.copy_(noise * 2.0 / param.shape[1] ** 0.5)


def build_family_hf(variant: str, num_layers: int = 2, seed: int = 1234) -> nn.Module:
    """A tiny random Mistral, Qwen2 or scaled-RoPE Llama (transformers' own classes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.1,
    )  # fmt: skip
    if variant.startswith("mistral"):
        config = AutoConfig.for_model("mistral", sliding_window=SLIDING_WINDOW, **shape)
    elif variant.startswith("qwen2"):
        tied = variant == "qwen2-tied"
        config = AutoConfig.for_model("qwen2", tie_word_embeddings=tied, **shape)
    elif variant == "llama3-rope":
        config = AutoConfig.for_model("llama", rope_parameters=dict(LLAMA3_ROPE), **shape)
    else:
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}
        config = AutoConfig.for_model("llama", rope_parameters=rope, **shape)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # transformers starts biases at zero: give them a visible effect
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.eval()
    model.generation_config.eos_token_id = None  # compare forced-length outputs
    model.generation_config.pad_token_id = 0
    return model


def _build_hf(variant: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, T5ForConditionalGeneration

    if variant in FAMILY_VARIANTS:
        return build_family_hf(variant)
    torch.manual_seed(1234)
    if variant.startswith("t5"):
        proj = "relu" if variant == "t5" else "gated-gelu"
        model = T5ForConditionalGeneration(_t5_config(proj, tie_word_embeddings=variant == "t5"))
        if variant == "t5-v1.1":
            # Real v1.1 / Flan-T5 checkpoints carry their own lm_head.
            model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))
        _spread_t5_weights(model, seed=7)
    else:
        config = LlamaConfig(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.1,
            rope_theta=10000.0 if variant == "llama" else 500000.0,
            tie_word_embeddings=variant == "llama-tied",
        )
        model = LlamaForCausalLM(config)
    model.eval()
    model.generation_config.eos_token_id = None  # compare forced-length outputs
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    pytest.importorskip("transformers")
    built: dict[str, Checkpoint] = {}
    for variant in VARIANTS:
        hf_model = _build_hf(variant)
        path = tmp_path_factory.mktemp(variant)
        hf_model.save_pretrained(path, safe_serialization=True)
        built[variant] = Checkpoint(variant, path, hf_model, load_model(str(path)))
    return built


@pytest.fixture(scope="session")
def default_loaded() -> LoadedModel:
    return load_model("exegpt-tiny-t5")
