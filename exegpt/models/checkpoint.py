"""Safetensors checkpoints in Hugging Face layout: parameter names, reading and writing.

Never unpickles anything: weights come only from `.safetensors` files.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from exegpt.models.config import ModelConfig
from exegpt.models.llama import LlamaModel
from exegpt.models.t5 import T5Model

Model = T5Model | LlamaModel

# Names a checkpoint may use instead of the canonical one (tied heads saved only once, old
# T5 exports that kept per-stack embedding copies).
_ALIASES: dict[str, tuple[str, ...]] = {
    "shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    "lm_head.weight": ("shared.weight", "model.embed_tokens.weight"),
}


def create_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Model:
    """A model with uninitialised storage on `device`, ready to receive weights."""
    with torch.device("meta"):  # no memory, no wasted random init
        model: Model = T5Model(config) if config.family == "t5" else LlamaModel(config)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            storage = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, name, nn.Parameter(storage, requires_grad=False))
    model.tie_weights()  # each use of a shared parameter got its own tensor above
    return model.eval()


def hf_parameter_names(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the Hugging Face checkpoint name, for every parameter we own."""
    names = _t5_names(config) if config.family == "t5" else _llama_names(config)
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _t5_names(config: ModelConfig) -> dict[str, str]:
    ffn = ("wi", "wo") if config.ffn == "relu" else ("wi_0", "wi_1", "wo")
    names = {
        "embed.weight": "shared.weight",
        "encoder_final_norm.weight": "encoder.final_layer_norm.weight",
        "decoder_final_norm.weight": "decoder.final_layer_norm.weight",
    }

    def attention(ours: str, theirs: str, with_bias: bool) -> None:
        for proj in ("q", "k", "v", "o"):
            names[f"{ours}.{proj}.weight"] = f"{theirs}.{proj}.weight"
        if with_bias:
            names[f"{ours}.relative_attention_bias.weight"] = (
                f"{theirs}.relative_attention_bias.weight"
            )

    for i in range(config.num_encoder_layers):
        ours, theirs = f"encoder_layers.{i}", f"encoder.block.{i}.layer"
        attention(f"{ours}.self_attn", f"{theirs}.0.SelfAttention", with_bias=i == 0)
        names[f"{ours}.attn_norm.weight"] = f"{theirs}.0.layer_norm.weight"
        names[f"{ours}.ffn_norm.weight"] = f"{theirs}.1.layer_norm.weight"
        for w in ffn:
            names[f"{ours}.ffn.{w}.weight"] = f"{theirs}.1.DenseReluDense.{w}.weight"
    for i in range(config.num_decoder_layers):
        ours, theirs = f"decoder_layers.{i}", f"decoder.block.{i}.layer"
        attention(f"{ours}.self_attn", f"{theirs}.0.SelfAttention", with_bias=i == 0)
        attention(f"{ours}.cross_attn", f"{theirs}.1.EncDecAttention", with_bias=False)
        names[f"{ours}.self_attn_norm.weight"] = f"{theirs}.0.layer_norm.weight"
        names[f"{ours}.cross_attn_norm.weight"] = f"{theirs}.1.layer_norm.weight"
        names[f"{ours}.ffn_norm.weight"] = f"{theirs}.2.layer_norm.weight"
        for w in ffn:
            names[f"{ours}.ffn.{w}.weight"] = f"{theirs}.2.DenseReluDense.{w}.weight"
    return names


def _llama_names(config: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    for i in range(config.num_decoder_layers):
        ours, theirs = f"decoder_layers.{i}", f"model.layers.{i}"
        names[f"{ours}.attn_norm.weight"] = f"{theirs}.input_layernorm.weight"
        names[f"{ours}.ffn_norm.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{ours}.self_attn.{proj}.weight"] = f"{theirs}.self_attn.{proj}.weight"
            if config.qkv_bias and proj != "o_proj":  # Qwen2
                names[f"{ours}.self_attn.{proj}.bias"] = f"{theirs}.self_attn.{proj}.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}.mlp.{proj}.weight"] = f"{theirs}.mlp.{proj}.weight"
    return names


def _resolve(hf_name: str, available: dict[str, Path]) -> str:
    for candidate in (hf_name, *_ALIASES.get(hf_name, ())):
        if candidate in available:
            return candidate
    raise ValueError(f"checkpoint has no tensor {hf_name!r}")


@torch.no_grad()
def load_weights(model: nn.Module, config: ModelConfig, tensor_files: dict[str, Path]) -> None:
    """Copy tensors (HF name -> file holding it) into the model, casting to its dtype."""
    params = dict(model.named_parameters())
    names = hf_parameter_names(config)
    if set(names) != set(params):
        raise AssertionError(f"name map out of sync with the model: {set(names) ^ set(params)}")
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for ours, theirs in names.items():
        source = _resolve(theirs, tensor_files)
        by_file[tensor_files[source]].append((ours, source))
    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for ours, source in pairs:
                tensor = handle.get_tensor(source)
                if tensor.shape != params[ours].shape:
                    raise ValueError(
                        f"tensor {source!r} in {path.name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(params[ours].shape)}"
                    )
                params[ours].copy_(tensor)


def list_tensors(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return list(handle.keys())


def save_weights(model: nn.Module, config: ModelConfig, path: Path) -> None:
    """Write the model's parameters under their HF names to one safetensors file."""
    params = dict(model.named_parameters())
    tensors = {
        theirs: params[ours].detach().to("cpu").contiguous()
        for ours, theirs in hf_parameter_names(config).items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
