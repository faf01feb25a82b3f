"""A roofline cost model: per-layer costs from the model's shape and the device's datasheet.

`AnalyticCostModel` implements `exegpt.cost_model.CostModel` without measuring anything, so
the simulator can plan for devices nobody has profiled (and tests get a cheap, real model).

Each kernel takes `max(flops / (peak_flops * flops_efficiency), bytes / (bandwidth *
bandwidth_efficiency))` plus a fixed launch overhead per kernel: compute-bound for long
prefills, memory-bound for decode steps (weights and KV are re-read every step), overhead-bound
for tiny batches. Communication is alpha-beta: a point-to-point transfer costs
`link_latency_s + bytes / link_bytes_s`; a ring all-reduce over `t` devices costs
`2 (t - 1) (allreduce_latency_s + bytes / (t * allreduce_bytes_s))`.

What is counted per layer
- encode attention: QK^T and AV over the whole sequence (half the work when causal, i.e. the
  prefill of a decoder-only model); reads Q, K, V and writes the output once.
- encode rest: every weight matrix of the layer (Q, K, V, O projections and the FFN) applied
  to every token, reading the weights once, plus the activations in and out.
- decode attention: one query per sequence over its cached K/V (self) and the encoder's (cross);
  reading the cache dominates.
- decode rest: the same matrices for one token per sequence (plus cross-attention Q and O);
  the cross-attention K/V projection of the encoder output is computed once per sequence and
  is folded into the encode cost.
Weights, KV and cross-KV bytes are exact for the architecture at the given TP shard (norms
are replicated, matrices split `tp_degree` ways).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exegpt.cost_model import ModelShape

if TYPE_CHECKING:
    from exegpt.models.config import ModelConfig

_KERNELS_PER_ATTENTION = 2  # score/softmax/value fused pair
_KERNELS_PER_REST = 8  # QKV, O, FFN in/act/out, two norms, residual


@dataclass(frozen=True)
class ArchSpec:
    """The transformer's dimensions as the roofline counts them (FLOPs and bytes exactly).

    A model exegpt runs is described once, by its `ModelConfig` (`from_config`); the presets
    written out below are the paper's models, which exegpt cannot load (OPT) or does not
    ship."""

    name: str
    is_encoder_decoder: bool
    num_encoder_layers: int  # 0 for decoder-only
    num_decoder_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    gated_ffn: bool
    tie_word_embeddings: bool
    dtype_bytes: int
    max_context_tokens: int

    def __post_init__(self) -> None:
        dims = (self.num_decoder_layers, self.d_model, self.num_heads, self.num_kv_heads)
        if min(dims + (self.head_dim, self.d_ff, self.vocab_size, self.dtype_bytes)) < 1:
            raise ValueError(f"{self.name}: model dimensions must be positive")
        if self.is_encoder_decoder != (self.num_encoder_layers > 0):
            raise ValueError(f"{self.name}: encoder layers iff the model is encoder-decoder")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")

    @classmethod
    def from_config(cls, name: str, config: ModelConfig, dtype_bytes: int) -> ArchSpec:
        """The dimensions of a model exegpt runs, read from its one description."""
        return cls(
            name,
            config.is_encoder_decoder,
            config.num_encoder_layers,
            config.num_decoder_layers,
            config.d_model,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.d_ff,
            config.vocab_size,
            config.ffn != "relu",
            config.tie_word_embeddings,
            dtype_bytes,
            config.max_context_tokens,
        )

    @property
    def shape(self) -> ModelShape:
        num_encode_layers = (
            self.num_encoder_layers if self.is_encoder_decoder else self.num_decoder_layers
        )
        return ModelShape(
            model_name=self.name,
            is_encoder_decoder=self.is_encoder_decoder,
            num_encode_layers=num_encode_layers,
            num_decode_layers=self.num_decoder_layers,
            hidden_size=self.d_model,
            dtype_bytes=self.dtype_bytes,
            max_context_tokens=self.max_context_tokens,
        )

    @property
    def attention_params(self) -> int:
        """Q, K, V and O projections of one attention block."""
        q_and_o = 2 * self.d_model * self.num_heads * self.head_dim
        return q_and_o + 2 * self.d_model * self.num_kv_heads * self.head_dim

    @property
    def ffn_params(self) -> int:
        return (3 if self.gated_ffn else 2) * self.d_model * self.d_ff


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers of one accelerator and its links."""

    name: str
    peak_flops: float  # dense, at the model's dtype
    memory_bytes_s: float  # memory bandwidth
    memory_bytes: int  # capacity
    link_bytes_s: float  # pipeline-stage point-to-point bandwidth
    link_latency_s: float
    allreduce_bytes_s: float  # per-link bandwidth of the TP ring
    allreduce_latency_s: float
    kernel_overhead_s: float  # launch + sync cost of one kernel
    max_tp_degree: int = 8  # devices that can form one TP group (one node)
    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8


_GIB = 1024**3

DEVICE_PRESETS: dict[str, DeviceSpec] = {
    # PCIe 4.0 x16 between GPUs, as in the paper's A40 cluster.
    "a40": DeviceSpec("a40", 149.7e12, 696e9, 48 * _GIB, 25e9, 10e-6, 20e9, 15e-6, 5e-6),
    "a100-40gb": DeviceSpec("a100-40gb", 312e12, 1555e9, 40 * _GIB, 240e9, 5e-6, 240e9, 8e-6, 4e-6),
    "a100-80gb": DeviceSpec("a100-80gb", 312e12, 2039e9, 80 * _GIB, 240e9, 5e-6, 240e9, 8e-6, 4e-6),
    "h100-80gb": DeviceSpec("h100-80gb", 989e12, 3350e9, 80 * _GIB, 400e9, 4e-6, 400e9, 6e-6, 3e-6),
    # One CPU worker process talking ZeroMQ over loopback and gloo for all-reduce.
    "cpu": DeviceSpec("cpu", 2e11, 20e9, 16 * _GIB, 2e9, 50e-6, 1e9, 100e-6, 20e-6),
}

MODEL_PRESETS: dict[str, ArchSpec] = {
    "t5-11b": ArchSpec(
        "t5-11b", True, 24, 24, 1024, 128, 128, 128, 65536, 32128, False, False, 2, 2048
    ),
    "opt-13b": ArchSpec(
        "opt-13b", False, 0, 40, 5120, 40, 40, 128, 20480, 50272, False, True, 2, 2048
    ),
    "llama-2-7b": ArchSpec(
        "llama-2-7b", False, 0, 32, 4096, 32, 32, 128, 11008, 32000, True, False, 2, 4096
    ),
}

# The embedded default model (exegpt.models.defaults), run in float32. Its config is read
# when it is asked for: the exegpt.models package imports torch, which a scheduler planning
# on a paper model or a profile file does not need.
DEFAULT_ANALYTIC_MODEL = "exegpt-tiny-t5"


def model_preset(name: str) -> ArchSpec:
    """The preset called `name`: the embedded default model or one of MODEL_PRESETS."""
    if name == DEFAULT_ANALYTIC_MODEL:
        from exegpt.models.defaults import DEFAULT_MODEL_NAME, default_model_config

        return ArchSpec.from_config(DEFAULT_MODEL_NAME, default_model_config(), 4)
    if name not in MODEL_PRESETS:
        known = ", ".join([DEFAULT_ANALYTIC_MODEL, *MODEL_PRESETS])
        raise ValueError(f"unknown analytic model {name!r}; known: {known}")
    return MODEL_PRESETS[name]


def _roofline_s(flops: float, num_bytes: float, num_kernels: int, device: DeviceSpec) -> float:
    compute_s = flops / (device.peak_flops * device.flops_efficiency)
    memory_s = num_bytes / (device.memory_bytes_s * device.bandwidth_efficiency)
    return max(compute_s, memory_s) + num_kernels * device.kernel_overhead_s


class AnalyticCostModel:
    """`CostModel` from an `ArchSpec` and a `DeviceSpec` (see the module docstring)."""

    def __init__(self, arch: ArchSpec, device: DeviceSpec) -> None:
        self.arch = arch
        self.device = device
        self._shape = arch.shape
        self._tp_degrees = tuple(
            t
            for t in (1, 2, 4, 8, 16)
            if t <= device.max_tp_degree and arch.num_kv_heads % t == 0 and arch.d_ff % t == 0
        )

    def __repr__(self) -> str:
        return f"AnalyticCostModel({self.arch.name} on {self.device.name})"

    @property
    def shape(self) -> ModelShape:
        return self._shape

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        return self._tp_degrees

    # ---- compute ---------------------------------------------------------------------------

    def encode_attention_s(self, batch_size: int, seq_len_tokens: int, tp_degree: int) -> float:
        arch = self.arch
        heads = arch.num_heads / tp_degree
        causal = 1.0 if arch.is_encoder_decoder else 0.5
        flops = 4.0 * batch_size * seq_len_tokens**2 * heads * arch.head_dim * causal
        qkvo_heads = 2 * arch.num_heads + 2 * arch.num_kv_heads
        num_bytes = batch_size * seq_len_tokens * qkvo_heads / tp_degree * arch.head_dim
        return _roofline_s(flops, num_bytes * arch.dtype_bytes, _KERNELS_PER_ATTENTION, self.device)

    def encode_rest_s(self, num_tokens: int, tp_degree: int) -> float:
        arch = self.arch
        params = (arch.attention_params + arch.ffn_params) / tp_degree
        activations = num_tokens * (4 * arch.d_model + 2 * arch.d_ff / tp_degree)
        cross_kv_flops = 0.0
        if arch.is_encoder_decoder:
            # The decoder's cross-attention K/V projections of this encoder output, all layers.
            cross_params = 2 * arch.d_model * arch.num_kv_heads * arch.head_dim / tp_degree
            share = arch.num_decoder_layers / arch.num_encoder_layers
            cross_kv_flops = 2.0 * num_tokens * cross_params * share
        flops = 2.0 * num_tokens * params + cross_kv_flops
        num_bytes = (params + activations) * arch.dtype_bytes
        return _roofline_s(flops, num_bytes, _KERNELS_PER_REST, self.device)

    def decode_attention_s(
        self, batch_size: int, kv_len_tokens: int, cross_len_tokens: int, tp_degree: int
    ) -> float:
        arch = self.arch
        context = kv_len_tokens + cross_len_tokens
        flops = 4.0 * batch_size * context * arch.num_heads / tp_degree * arch.head_dim
        kv_elems = batch_size * context * 2 * arch.num_kv_heads / tp_degree * arch.head_dim
        kernels = _KERNELS_PER_ATTENTION * (2 if cross_len_tokens else 1)
        return _roofline_s(flops, kv_elems * arch.dtype_bytes, kernels, self.device)

    def decode_rest_s(self, batch_size: int, tp_degree: int) -> float:
        arch = self.arch
        params = arch.attention_params + arch.ffn_params
        if arch.is_encoder_decoder:
            params += 2 * arch.d_model * arch.num_heads * arch.head_dim  # cross Q and O
        params /= tp_degree
        activations = batch_size * (4 * arch.d_model + 2 * arch.d_ff / tp_degree)
        flops = 2.0 * batch_size * params
        num_bytes = (params + activations) * arch.dtype_bytes
        return _roofline_s(flops, num_bytes, _KERNELS_PER_REST, self.device)

    def embedding_s(self, num_tokens: int) -> float:
        num_bytes = 2.0 * num_tokens * self.arch.d_model * self.arch.dtype_bytes
        return _roofline_s(0.0, num_bytes, 1, self.device)

    def lm_head_s(self, num_tokens: int) -> float:
        arch = self.arch
        flops = 2.0 * num_tokens * arch.d_model * arch.vocab_size
        num_bytes = (
            arch.vocab_size * arch.d_model + num_tokens * arch.vocab_size
        ) * arch.dtype_bytes
        return _roofline_s(flops, num_bytes, 2, self.device)

    # ---- communication ---------------------------------------------------------------------

    def allreduce_s(self, num_bytes: int, tp_degree: int) -> float:
        if tp_degree <= 1:
            return 0.0
        chunk_s = num_bytes / (tp_degree * self.device.allreduce_bytes_s)
        return 2 * (tp_degree - 1) * (self.device.allreduce_latency_s + chunk_s)

    def transfer_s(self, num_bytes: int) -> float:
        return self.device.link_latency_s + num_bytes / self.device.link_bytes_s

    # ---- memory ----------------------------------------------------------------------------

    def _sharded_bytes(self, matrix_params: int, num_norms: int, tp_degree: int) -> int:
        arch = self.arch
        return (matrix_params // tp_degree + num_norms * arch.d_model) * arch.dtype_bytes

    def encode_layer_weight_bytes(self, tp_degree: int) -> int:
        arch = self.arch
        if not arch.is_encoder_decoder:
            return self.decode_layer_weight_bytes(tp_degree)
        return self._sharded_bytes(arch.attention_params + arch.ffn_params, 2, tp_degree)

    def decode_layer_weight_bytes(self, tp_degree: int) -> int:
        arch = self.arch
        num_attention = 2 if arch.is_encoder_decoder else 1
        matrices = num_attention * arch.attention_params + arch.ffn_params
        return self._sharded_bytes(matrices, num_attention + 1, tp_degree)

    def embedding_weight_bytes(self) -> int:
        arch = self.arch
        tables = 1 if arch.tie_word_embeddings else 2
        num_final_norms = 2 if arch.is_encoder_decoder else 1
        params = tables * arch.vocab_size * arch.d_model + num_final_norms * arch.d_model
        return params * arch.dtype_bytes

    def kv_bytes_per_token(self, tp_degree: int) -> int:
        arch = self.arch
        return 2 * (arch.num_kv_heads // tp_degree) * arch.head_dim * arch.dtype_bytes

    def cross_kv_bytes_per_token(self, tp_degree: int) -> int:
        return self.kv_bytes_per_token(tp_degree) if self.arch.is_encoder_decoder else 0


def arch_from_hf_config(path: str | Path) -> ArchSpec:
    """An `ArchSpec` from a Hugging Face `config.json`, read as the workers read it
    (`ModelConfig.from_hf_dict`); its `torch_dtype` gives the bytes per element."""
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"model config not found: {config_path}")
    from exegpt.models.config import ModelConfig

    hf = json.loads(config_path.read_text())
    try:
        config = ModelConfig.from_hf_dict(hf)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{config_path}: not a usable model config ({error!r})") from None
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    dtype_bytes = 4 if hf.get("torch_dtype", hf.get("dtype")) == "float32" else 2
    name = str(hf.get("_name_or_path") or config_path.parent.name)
    return ArchSpec.from_config(name, config, dtype_bytes)


def analytic_cost_model(spec: str, model_config: str | None = None) -> AnalyticCostModel:
    """`DEVICE` or `DEVICE:MODEL` (presets), e.g. `a40:opt-13b`; `model_config` (a HF
    config.json) replaces the model preset."""
    device_name, _, model_name = spec.partition(":")
    if device_name not in DEVICE_PRESETS:
        known = ", ".join(DEVICE_PRESETS)
        raise ValueError(f"unknown analytic device {device_name!r}; known: {known}")
    if model_config is not None and model_name:
        raise ValueError("give either a model preset in the analytic spec or a model config")
    if model_config is not None:
        arch = arch_from_hf_config(model_config)
    else:
        arch = model_preset(model_name or DEFAULT_ANALYTIC_MODEL)
    return AnalyticCostModel(arch, DEVICE_PRESETS[device_name])
