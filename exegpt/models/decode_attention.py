"""Attention of one query token per row (a decode step), over keys already gathered.

On a CPU, `scaled_dot_product_attention` in bfloat16 tiles its flash kernel over query rows:
with a single query row per sequence it ran a batch-32 decode step's attention 4x slower than
two batched matmuls for the ~100M Llama shape (12 query heads over 4 KV heads) and 1.3x for
t5-small's (8 heads) on the development machine (AVX512-BF16, torch 2.13, KV 100-200;
benchmarks/decode_attention.py).
So bfloat16 and float16 on a CPU take the matmul path: each KV head's group of query heads
are the rows of one matmul (grouped-query attention without repeating K/V), and the softmax
runs in float32. float32 and GPUs keep SDPA: as fast or faster there, and float32 then stays
token-identical to transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def matmul_decode_applies(q: Tensor) -> bool:
    """Whether a decode step with queries `q` takes the matmul path (see the module doc)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def decode_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v for q [b, H, D] over k, v [b, T, H_kv, D]; `mask` as
    SDPA's attn_mask, broadcastable to [b, H, 1, T]: bool (True where visible) or additive;
    None: every key. Returns [b, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if not matmul_decode_applies(q):
        out = F.scaled_dot_product_attention(
            q[:, :, None],  # [b, H, 1, D]
            k.to(q.dtype).transpose(1, 2),
            v.to(q.dtype).transpose(1, 2),
            attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype),
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        return out[:, :, 0]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    keys = k.to(q.dtype).transpose(1, 2).contiguous()  # [b, H_kv, T, D]: rows the matmul reads
    values = v.to(q.dtype).transpose(1, 2).contiguous()
    scores = torch.matmul(grouped, keys.transpose(2, 3)).float() * scale  # [b, H_kv, G, T]
    if mask is not None:
        if mask.shape[1] != 1:  # per query head: [b, H, 1, T] -> [b, H_kv, G, T]
            mask = mask.reshape(batch, num_kv_heads, -1, mask.shape[-1])
        if mask.dtype == torch.bool:  # every row sees at least its own key
            # A hidden key's score is replaced, not added to: stale NaN keys are harmless.
            scores = torch.where(mask, scores, float("-inf"))
        else:
            scores += mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(batch, num_heads, head_dim)
