"""Mistral (sliding window), Qwen2 (q/k/v biases, tied or not) and scaled RoPE (llama3,
linear): token-identical to transformers through the engine, and each feature matters."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from exegpt.models.checkpoint import create_model
from exegpt.models.config import ModelConfig, RopeScaling, config_hash
from exegpt.models.layers import rope_inv_freq
from exegpt.models.loader import LoadedModel
from exegpt.models.tensor_parallel import Split, split_of
from services.worker.config import EngineConfig
from services.worker.server import build_engine
from services.worker.step_plan import StepKind
from tests.models.conftest import FAMILY_VARIANTS, LLAMA3_ROPE, SLIDING_WINDOW, Checkpoint
from tests.models.helpers import PROMPTS, greedy, make_runner
from tests.models.test_hf_equivalence import NUM_NEW_TOKENS, hf_greedy_single
from tests.wait import wait_until
from tests.worker.test_engine import submit


@pytest.mark.parametrize(
    ("variant", "chunk"),
    [(variant, None) for variant in FAMILY_VARIANTS] + [("mistral-window", 5), ("qwen2", 5)],
)
def test_engine_tokens_match_transformers(
    checkpoints: dict[str, Checkpoint], variant: str, chunk: int | None
) -> None:
    """Chunked prefill (`chunk` tokens a step) attends to cached keys: the sliding window
    must hold across chunk boundaries too. The budget binds while a sequence decodes, so a
    leader request decodes while the prompts are admitted."""
    ckpt = checkpoints[variant]
    config = EngineConfig(max_batch_size=8, kv_block_size_tokens=4, max_tokens_per_step=chunk)
    engine = build_engine(ckpt.loaded, config)
    kinds: list[StepKind] = []
    engine.step_observers.append(lambda kind, num_rows, result: kinds.append(kind))
    engine.start()
    try:
        leader = submit(
            engine, PROMPTS[3], "leader", max_tokens=4 * NUM_NEW_TOKENS, ignore_eos=True
        )
        wait_until(lambda: leader.token_ids, what="the leader's first token")
        collectors = [
            submit(engine, p, f"r{i}", max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
            for i, p in enumerate(PROMPTS)
        ]
        ours = [c.wait().token_ids for c in collectors]
        leader.wait()
    finally:
        engine.stop()
    assert ours == [hf_greedy_single(ckpt, prompt) for prompt in PROMPTS]
    assert len({tuple(out) for out in ours}) == len(PROMPTS)
    assert chunk is None or StepKind.MIXED in kinds  # chunks rode along the leader's decodes


def _without(loaded: LoadedModel, feature: str) -> LoadedModel:
    """The same weights with one family feature switched off."""
    if feature == "qkv_bias":
        model = copy.deepcopy(loaded.model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.zero_()
        return replace(loaded, model=model)
    config = replace(loaded.config, **{feature: None})
    model = create_model(config)
    model.load_state_dict(loaded.model.state_dict())
    return replace(loaded, config=config, model=model)


@pytest.mark.parametrize(
    ("variant", "feature"),
    [
        ("mistral-window", "sliding_window"),
        ("qwen2", "qkv_bias"),
        ("llama3-rope", "rope_scaling"),
        ("llama-linear-rope", "rope_scaling"),
    ],
)
def test_each_feature_changes_the_tokens(
    checkpoints: dict[str, Checkpoint], variant: str, feature: str
) -> None:
    """Without the feature the tokens differ: the equality above proves it is implemented."""
    loaded = checkpoints[variant].loaded
    assert getattr(loaded.config, feature)
    plain = greedy(make_runner(_without(loaded, feature)), PROMPTS, NUM_NEW_TOKENS)
    assert plain != [hf_greedy_single(checkpoints[variant], p) for p in PROMPTS]


def test_family_configs_are_read_from_transformers_checkpoints(
    checkpoints: dict[str, Checkpoint],
) -> None:
    assert checkpoints["mistral-window"].loaded.config.sliding_window == SLIDING_WINDOW
    qwen2 = checkpoints["qwen2"].loaded.config
    assert qwen2.qkv_bias and not qwen2.tie_word_embeddings and qwen2.sliding_window is None
    assert checkpoints["qwen2-tied"].loaded.config.tie_word_embeddings
    scaling = checkpoints["llama3-rope"].loaded.config.rope_scaling
    assert scaling == RopeScaling("llama3", 4.0, 1.0, 4.0, 64)
    assert checkpoints["llama-linear-rope"].loaded.config.rope_scaling == RopeScaling("linear", 3.0)
    for variant in FAMILY_VARIANTS:  # to_hf_dict reads back to the same config
        config = checkpoints[variant].loaded.config
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def _llama_hf(**extra: object) -> dict[str, object]:
    return {
        "model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, **extra,
    }  # fmt: skip


def test_llama31_rope_scaling_in_the_transformers_4_layout() -> None:
    rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    config = ModelConfig.from_hf_dict(_llama_hf(rope_theta=500000.0, rope_scaling=rope))
    assert config.rope_theta == 500000.0 and config.rope_scaling is not None
    plain = rope_inv_freq(16, 500000.0)
    scaled = rope_inv_freq(16, 500000.0, config.rope_scaling)
    assert scaled[0] == plain[0] and scaled[-1] == plain[-1] / 4.0  # high kept, low slowed


def test_unsupported_variants_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        ModelConfig.from_hf_dict(_llama_hf(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    qwen2 = _llama_hf(model_type="qwen2", use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="sliding attention in some layers only"):
        ModelConfig.from_hf_dict({**qwen2, "max_window_layers": 1})
    assert ModelConfig.from_hf_dict({**qwen2, "max_window_layers": 2}).sliding_window is None


def test_config_hashes_of_existing_models_are_unchanged() -> None:
    """Profiles are keyed by the hash: fields added at their defaults must not move it."""
    config = ModelConfig.from_hf_dict(_llama_hf())
    # The hash this config had before the Mistral, Qwen2 and RoPE-scaling fields existed.
    assert config_hash(config) == "ceece62427d03996a6fb7a6f1378f28a35b2e7d04011fe4ccfb24b93b73a120a"
    assert config_hash(config) != config_hash(replace(config, sliding_window=4))
    assert config_hash(config) != config_hash(replace(config, qkv_bias=True))


def test_column_parallel_biases_split_with_their_rows() -> None:
    assert split_of("self_attn.q_proj.bias") is Split.COLUMN
    assert split_of("self_attn.v_proj.weight") is Split.COLUMN
    with pytest.raises(ValueError, match="row-parallel"):
        split_of("self_attn.o_proj.bias")
