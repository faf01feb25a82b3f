"""ModelConfig: reading HF config.json dicts, writing them back, and the stable hash."""

from __future__ import annotations

import dataclasses

import pytest

from exegpt.models.config import ModelConfig, config_hash
from exegpt.models.defaults import default_model_config

FLAN_T5_SMALL = {
    "model_type": "t5",
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 8,
    "num_decoder_layers": 8,
    "num_heads": 6,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "vocab_size": 32128,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "decoder_start_token_id": 0,
    "n_positions": 512,
}

LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "eos_token_id": [128001, 128009],
    "bos_token_id": 128000,
}


def test_flan_t5_config() -> None:
    config = ModelConfig.from_hf_dict(FLAN_T5_SMALL)
    assert config.ffn == "gated-gelu" and not config.tie_word_embeddings
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (6, 6, 64)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (8, 8)
    assert config.num_kv_layers == 8 and config.is_encoder_decoder


def test_transformers5_t5_layout() -> None:
    """transformers 5 writes tie_word_embeddings=True and keeps the switch elsewhere."""
    hf = {**FLAN_T5_SMALL, "tie_word_embeddings": True, "scale_decoder_outputs": False}
    assert not ModelConfig.from_hf_dict(hf).tie_word_embeddings
    original = {**FLAN_T5_SMALL, "feed_forward_proj": "relu"}
    del original["tie_word_embeddings"]
    assert ModelConfig.from_hf_dict(original).tie_word_embeddings


def test_llama_config() -> None:
    config = ModelConfig.from_hf_dict(LLAMA)
    assert (config.head_dim, config.num_kv_heads, config.rope_theta) == (32, 2, 500000.0)
    assert config.eos_token_id == 128001 and config.bos_token_id == 128000
    assert config.pad_token_id is None and config.num_encoder_layers == 0
    assert config.num_kv_layers == 4 and not config.tie_word_embeddings
    nested = {**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    del nested["rope_theta"]
    assert ModelConfig.from_hf_dict(nested).rope_theta == 1e6


@pytest.mark.parametrize(
    ("hf", "message"),
    [
        ({"model_type": "bert"}, "unsupported model_type 'bert'"),
        ({**FLAN_T5_SMALL, "feed_forward_proj": "gated-silu"}, "feed_forward_proj"),
        ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
        ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope type"),
        ({**LLAMA, "attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_configs(hf: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(hf)


@pytest.mark.parametrize("hf", [FLAN_T5_SMALL, LLAMA])
def test_hf_dict_round_trip(hf: dict[str, object]) -> None:
    config = ModelConfig.from_hf_dict(hf)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    default = default_model_config()
    assert ModelConfig.from_hf_dict(default.to_hf_dict()) == default


def test_config_hash_is_stable() -> None:
    config = default_model_config()
    assert config_hash(config) == config.config_hash() == config_hash(default_model_config())
    assert len(config_hash(config)) == 64
    other = dataclasses.replace(config, num_decoder_layers=5)
    assert config_hash(other) != config_hash(config)


def test_invalid_config() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(ModelConfig.from_hf_dict(LLAMA), num_kv_heads=3)
    with pytest.raises(ValueError, match="ffn"):
        dataclasses.replace(default_model_config(), ffn="swiglu")
