"""Linear weights pre-packed for oneDNN, for bfloat16 on CPUs: the small-batch path.

A plain bfloat16 `F.linear` on a CPU re-lays its weight out for oneDNN's bf16 kernel on every
call. At decode's tiny batches that reorder costs more than the multiply: a bf16 Linear at
M=1 ran 1.0-1.5x *slower* than float32 on the development machine (AVX512-BF16, torch 2.13).
Packing each weight once, at load, into oneDNN's blocked layout removes the reorder: the
packed bf16 Linear then ran at 0.03-0.5x float32's time at every M from 1 to 32 and every
width of the benchmark models (the measurement is `benchmarks/linear_kernels.py`).

The packed kernel computes the same products in the same order: its outputs are bit-identical
to `F.linear` in bfloat16 (tests/models/test_prepack.py), so tokens do not change.

Before packing, the Linears that read the same input are fused into one GEMM: a Llama layer's
q, k and v projections, and its MLP's gate and up (`fuse_projections`). Decode's GEMMs are
small (M = the batch), so one call instead of three saves the calls' fixed cost: about 10%
of those Linears' time at M = 32 for the ~100M Llama shape, nothing at prefill's M (the
measurement is `benchmarks/step_time.py`). float32 keeps its separate Linears (its token
identity with transformers is checked, and nothing is packed there).

Packing replaces each `nn.Linear` of a serving model by a `PackedLinear`; the plain weight is
dropped, so memory does not grow, except for a tied head (the embedding keeps its table and
the head gets a packed copy). Pack only a model that is about to serve: after loading and
after any tensor-parallel slicing, never one that is profiled for its parameters or saved.
"""

from __future__ import annotations

import torch
from torch import nn

# What a profile or log calls the two ways a Linear runs.
PACKED_KERNEL = "onednn-packed"
PLAIN_KERNEL = "aten"


def packing_applies(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether Linears in `dtype` on `device` run faster packed: bfloat16 on a CPU whose torch
    has oneDNN with bf16 kernels. float32 and float16, and every GPU, keep plain Linears."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return False
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def linear_kernel(dtype: torch.dtype, device: torch.device | str) -> str:
    """The kernel a serving model's Linears run in `dtype` on `device` (for logs and profiles)."""
    return PACKED_KERNEL if packing_applies(dtype, device) else PLAIN_KERNEL


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight packed once for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False
        )
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, each Llama layer's q/k/v and gate/up Linears into one GEMM each where
    `packing_applies` to their weights; returns how many modules were fused."""
    from exegpt.models.layers import SwiGLU
    from exegpt.models.llama import LlamaAttention

    fusable = [
        module
        for module in model.modules()
        if (isinstance(module, LlamaAttention) and module.qkv_proj is None)
        or (isinstance(module, SwiGLU) and module.gate_up_proj is None)
    ]
    weights = [next(module.parameters()) for module in fusable]
    targets = [
        m for m, w in zip(fusable, weights, strict=True) if packing_applies(w.dtype, w.device)
    ]
    for module in targets:
        module.fuse()
    return len(targets)


def pack_linears(model: nn.Module) -> int:
    """Fuse the projections that share an input (`fuse_projections`), then replace every
    bfloat16 CPU `nn.Linear` in `model` by a `PackedLinear`, in place, where
    `packing_applies`; returns how many were replaced (0 where packing does not apply)."""
    fuse_projections(model)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and packing_applies(child.weight.dtype, child.weight.device)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
