"""The embedded default model: a small original-variant T5 with seeded random weights."""

from __future__ import annotations

import torch

from exegpt.models.checkpoint import create_model
from exegpt.models.config import ModelConfig
from exegpt.models.t5 import T5Model

DEFAULT_MODEL_NAME = "exegpt-tiny-t5"
DEFAULT_MODEL_SEED = 20240427


def default_model_config() -> ModelConfig:
    return ModelConfig(
        family="t5",
        vocab_size=384,
        d_model=256,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        d_ff=1024,
        num_encoder_layers=4,
        num_decoder_layers=4,
        ffn="relu",
        tie_word_embeddings=True,
        norm_eps=1e-6,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        decoder_start_token_id=0,
        max_context_tokens=1024,
    )


# HF T5's init makes a random model repeat one token whatever the prompt: attention is near
# uniform and the tied head favours the input token. These gains sharpen attention (so the
# output depends on the prompt and the history) and randomise the final norm's signs.
_GAINS = {
    "self_attn.q": 10.0**0.5,
    "self_attn.k": 10.0**0.5,
    "self_attn.relative_attention_bias": 10.0,
    "cross_attn.q": 5.0,
    "cross_attn.k": 5.0,
    "cross_attn.o": 4.0,
}


def _init_std(name: str, config: ModelConfig) -> float | None:
    """Initialisation scale of a parameter (HF T5's, times a gain); None: start at one."""
    if name == "decoder_final_norm.weight":
        return 1.0
    if name.endswith("norm.weight"):
        return None
    if name in ("embed.weight", "lm_head.weight"):
        return 1.0  # the tied head rescales by d_model**-0.5, so logits come out near unit scale
    inner = config.num_heads * config.head_dim
    module, projection = name.rsplit(".", 3)[-3:-1]
    base = {
        "q": (config.d_model * config.head_dim) ** -0.5,
        "k": config.d_model**-0.5,
        "v": config.d_model**-0.5,
        "o": inner**-0.5,
        "relative_attention_bias": config.d_model**-0.5,
        "wi": config.d_model**-0.5,
        "wi_0": config.d_model**-0.5,
        "wi_1": config.d_model**-0.5,
        "wo": config.d_ff**-0.5,
    }[projection]
    return base * _GAINS.get(f"{module}.{projection}", 1.0)


@torch.no_grad()
def init_t5_weights(model: T5Model, seed: int) -> None:
    """Deterministic init: one CPU generator, parameters visited in registration order."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        std = _init_std(name, model.config)
        if std is None:
            param.fill_(1.0)
            continue
        values = torch.empty(param.shape, dtype=torch.float32)
        values.normal_(mean=0.0, std=std, generator=generator)
        param.copy_(values)


def build_default_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> T5Model:
    model = create_model(default_model_config(), device=device, dtype=dtype)
    assert isinstance(model, T5Model)
    init_t5_weights(model, DEFAULT_MODEL_SEED)
    return model
