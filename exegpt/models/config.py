"""Model configuration: one frozen dataclass for all supported families, from HF config.json."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["t5", "llama"]
FfnKind = Literal["relu", "gated-gelu", "swiglu"]

_T5_FFN: dict[str, FfnKind] = {"relu": "relu", "gated-gelu": "gated-gelu"}
# Llama-shaped checkpoints: the same layers, with q/k/v biases (Qwen2) or a sliding window
# (Mistral) read from their config.
_LLAMA_TYPES = ("llama", "mistral", "qwen2")
RopeType = Literal["llama3", "linear"]


@dataclass(frozen=True)
class RopeScaling:
    """Scaled RoPE frequencies (Llama 3.x "llama3", or plain "linear" position interpolation)."""

    rope_type: RopeType
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out["low_freq_factor"] = self.low_freq_factor
            out["high_freq_factor"] = self.high_freq_factor
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    num_encoder_layers: int  # 0 for decoder-only models
    num_decoder_layers: int
    ffn: FfnKind
    tie_word_embeddings: bool  # T5: also scales the decoder output by d_model**-0.5
    norm_eps: float
    eos_token_id: int
    pad_token_id: int | None
    bos_token_id: int | None
    decoder_start_token_id: int | None  # T5 only
    max_context_tokens: int
    rope_theta: float = 10000.0  # Llama only
    relative_attention_num_buckets: int = 32  # T5 only
    relative_attention_max_distance: int = 128  # T5 only
    qkv_bias: bool = False  # Llama-shaped only: q/k/v projections with biases (Qwen2)
    sliding_window: int | None = None  # Mistral: a query sees only the last `window` keys
    rope_scaling: RopeScaling | None = None  # Llama 3.x long-context RoPE

    def __post_init__(self) -> None:
        if self.family not in ("t5", "llama"):
            raise ValueError(f"unknown model family {self.family!r}; expected 't5' or 'llama'")
        allowed: tuple[str, ...] = ("relu", "gated-gelu") if self.family == "t5" else ("swiglu",)
        if self.ffn not in allowed:
            raise ValueError(f"ffn {self.ffn!r} is not supported for {self.family}: use {allowed}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.family == "t5" and self.num_kv_heads != self.num_heads:
            raise ValueError("T5 has no grouped-query attention: num_kv_heads must equal num_heads")
        if self.family == "llama" and self.num_encoder_layers != 0:
            raise ValueError("a decoder-only model has no encoder layers")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "t5"

    @property
    def num_kv_layers(self) -> int:
        """Layers that keep a KV cache (T5: decoder layers, self and cross; Llama: all)."""
        return self.num_decoder_layers

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type in ("t5", "mt5"):
            return _t5_from_hf(hf)
        if model_type in _LLAMA_TYPES:
            return _llama_from_hf(hf)
        raise ValueError(
            f"unsupported model_type {model_type!r}: exegpt runs 't5' (original, v1.1, Flan-T5), "
            "'mt5', 'llama', 'mistral' and 'qwen2' checkpoints"
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that both transformers and `from_hf_dict` read back."""
        return _t5_to_hf(self) if self.family == "t5" else _llama_to_hf(self)

    def config_hash(self) -> str:
        return config_hash(self)


def config_hash(config: ModelConfig) -> str:
    """sha256 of the canonical JSON of the config: a stable key for profiles."""
    fields = dataclasses.asdict(config)
    for name in _HASH_OPTIONAL:  # fields added later: absent at their defaults, so the hashes
        if fields[name] == _HASH_OPTIONAL[name]:  # of existing profiles stay valid
            del fields[name]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_HASH_OPTIONAL: dict[str, Any] = {"qkv_bias": False, "sliding_window": None, "rope_scaling": None}


def _first_id(value: int | list[int] | None) -> int | None:
    # Some checkpoints (Llama 3) list several EOS ids; the first is the canonical one.
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _t5_from_hf(hf: dict[str, Any]) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _T5_FFN:
        raise ValueError(
            f"unsupported T5 feed_forward_proj {proj!r}: expected 'relu' (original T5) or "
            "'gated-gelu' (T5 v1.1 / Flan-T5)"
        )
    if proj == "gated-gelu" and hf.get("dense_act_fn", "gelu_new") not in ("gelu_new", "gelu"):
        raise ValueError(f"unsupported T5 dense_act_fn {hf['dense_act_fn']!r} for gated-gelu")
    # transformers 5 always writes tie_word_embeddings=True and keeps the real switch
    # (whether the decoder output is scaled for a tied head) in scale_decoder_outputs.
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    num_heads = int(hf.get("num_heads", 8))
    num_layers = int(hf.get("num_layers", 6))
    pad = _first_id(hf.get("pad_token_id", 0))
    start = _first_id(hf.get("decoder_start_token_id"))
    return ModelConfig(
        family="t5",
        vocab_size=int(hf.get("vocab_size", 32128)),
        d_model=int(hf.get("d_model", 512)),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=int(hf.get("d_kv", 64)),
        d_ff=int(hf.get("d_ff", 2048)),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
        ffn=_T5_FFN[proj],
        tie_word_embeddings=bool(tied),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        eos_token_id=_first_id(hf.get("eos_token_id", 1)) or 0,
        pad_token_id=pad,
        bos_token_id=None,
        decoder_start_token_id=start if start is not None else (pad or 0),
        max_context_tokens=int(hf.get("n_positions", 512)),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
    )


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, from `rope_scaling` (transformers 4) or `rope_parameters`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(rope["factor"]))
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    raise ValueError(
        f"unsupported rope type {rope_type!r}: plain RoPE, 'llama3' and 'linear' are implemented"
    )


def _sliding_window(hf: dict[str, Any], num_layers: int) -> int | None:
    window = hf.get("sliding_window")
    if hf.get("model_type") == "mistral":
        return None if window is None else int(window)
    if hf.get("model_type") == "qwen2":
        # Qwen2 slides only in layers from max_window_layers on; per-layer windows are not
        # implemented, so such a config is refused unless no layer actually slides.
        sliding = "sliding_attention" in (hf.get("layer_types") or [])
        if hf.get("use_sliding_window") and window is not None:
            sliding = sliding or int(hf.get("max_window_layers", 28)) < num_layers
        if sliding:
            raise ValueError(
                "Qwen2 with use_sliding_window and max_window_layers < num_hidden_layers "
                "(sliding attention in some layers only) is not supported"
            )
    return None


def _llama_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported Llama hidden_act {act!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    d_model = int(hf["hidden_size"])
    num_heads = int(hf["num_attention_heads"])
    num_layers = int(hf["num_hidden_layers"])
    theta, scaling = _rope(hf)
    return ModelConfig(
        family="llama",
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or d_model // num_heads),
        d_ff=int(hf["intermediate_size"]),
        num_encoder_layers=0,
        num_decoder_layers=num_layers,
        ffn="swiglu",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        eos_token_id=_first_id(hf.get("eos_token_id", 2)) or 0,
        pad_token_id=_first_id(hf.get("pad_token_id")),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        decoder_start_token_id=None,
        max_context_tokens=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        qkv_bias=hf.get("model_type") == "qwen2",
        sliding_window=_sliding_window(hf, num_layers),
        rope_scaling=scaling,
    )


def _t5_to_hf(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": config.d_ff,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "feed_forward_proj": config.ffn,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.tie_word_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "n_positions": config.max_context_tokens,
        "is_encoder_decoder": True,
        "dropout_rate": 0.0,
    }


def _llama_to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.qkv_bias and config.sliding_window is not None:
        raise ValueError("no Hugging Face model type has both q/k/v biases and a sliding window")
    model_type, arch = "llama", "LlamaForCausalLM"
    extra: dict[str, Any] = {"attention_bias": False, "mlp_bias": False}
    if config.qkv_bias:
        model_type, arch, extra = "qwen2", "Qwen2ForCausalLM", {"use_sliding_window": False}
    elif config.sliding_window is not None:
        model_type, arch, extra = "mistral", "MistralForCausalLM", {}
        extra["sliding_window"] = config.sliding_window
    if config.rope_scaling is not None:
        extra["rope_scaling"] = config.rope_scaling.to_hf_dict()
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_decoder_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_context_tokens,
        "tie_word_embeddings": config.tie_word_embeddings,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        **extra,
    }
