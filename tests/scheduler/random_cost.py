"""A random but plausible analytic cost model, for property tests of the simulator and search."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from services.scheduler.analytic_cost import DEVICE_PRESETS, AnalyticCostModel, ArchSpec


def random_cost_model(seed: int) -> AnalyticCostModel:
    """A random model and device, the same for the same seed."""
    rng = np.random.default_rng(seed)
    heads = int(rng.choice([4, 8, 16]))
    head_dim = int(rng.choice([32, 64, 128]))
    d_model = heads * head_dim
    is_encoder_decoder = bool(rng.integers(2))
    num_layers = int(rng.integers(2, 13))
    arch = ArchSpec(
        name=f"random-{seed}",
        is_encoder_decoder=is_encoder_decoder,
        num_encoder_layers=num_layers if is_encoder_decoder else 0,
        num_decoder_layers=num_layers,
        d_model=d_model,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        d_ff=4 * d_model,
        vocab_size=int(rng.integers(1000, 50000)),
        gated_ffn=bool(rng.integers(2)),
        tie_word_embeddings=bool(rng.integers(2)),
        dtype_bytes=2,
        max_context_tokens=4096,
    )
    base = DEVICE_PRESETS[str(rng.choice(["a40", "a100-40gb", "h100-80gb", "cpu"]))]
    device = replace(
        base,
        name=f"{base.name}-random-{seed}",
        peak_flops=base.peak_flops * math.exp(rng.uniform(-1.0, 1.0)),
        memory_bytes_s=base.memory_bytes_s * math.exp(rng.uniform(-1.0, 1.0)),
        link_bytes_s=base.link_bytes_s * math.exp(rng.uniform(-1.0, 1.0)),
        kernel_overhead_s=base.kernel_overhead_s * math.exp(rng.uniform(-1.0, 1.0)),
    )
    return AnalyticCostModel(arch, device)
