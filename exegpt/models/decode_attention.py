"""Attention of one query token per row (a decode step), over keys already gathered.

On a CPU, `scaled_dot_product_attention` in bfloat16 tiles its flash kernel over query rows:
with a single query row per sequence it ran a batch-32 decode step's attention 4x slower than
two batched matmuls for the ~100M Llama shape (12 query heads over 4 KV heads) and 1.3x for
t5-small's (8 heads) on the development machine (AVX512-BF16, torch 2.13, KV 100-200;
benchmarks/decode_attention.py).
So bfloat16 and float16 on a CPU take the matmul path, two batched matmuls per call that read
the gathered K/V as they are, [b, T, H_kv x D] rows (no transposed copy): the queries are laid
out block-diagonally, [b, H, H_kv x D] with query head h's D values under its KV head's columns
and zeros elsewhere (grouped-query attention without repeating K/V), and the diagonal blocks of
the output are kept. That multiplies the matmul work by H_kv, but a decode step's attention is
bound by moving K/V, and a bf16 bmm with few rows (the query group) runs far below its rate:
against a grouped bmm over K/V transposed to [b, H_kv, T, D] the block-diagonal path ran
1.6x faster for the Llama shape and 2.9x for t5-small's (batch 32, KV 100-200), 2.2x for 32
heads over 8 KV heads of 128 and 1.6x for 32 over 32 (batch 8, KV 384-512). The softmax
runs in float32. float32 and GPUs keep SDPA: as fast or faster there, and float32 then stays
token-identical to transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def matmul_attention_applies(q: Tensor) -> bool:
    """Whether attention with queries `q` may take a matmul path instead of SDPA: bf16/fp16 on
    a CPU (see the module doc; prefill_attention.py adds its own length bound)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def decode_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v for q [b, H, D] over k, v [b, T, H_kv, D]; `mask` as
    SDPA's attn_mask, 4-D [b | 1, H | 1, 1, T]: bool (True where visible) or additive; None:
    every key. Returns [b, H, D].

    Callers zero the values at hidden keys (and the keys too, unless the mask is bool): a
    stale non-finite value there would reach the output as 0 x NaN. On the matmul path the
    block-diagonal queries couple the heads of one token: a non-finite value in a visible key
    would reach every head's score for it (never seen with finite weights)."""
    num_heads, num_kv_heads = q.shape[1], k.shape[2]
    if not matmul_attention_applies(q):
        out = F.scaled_dot_product_attention(
            q[:, :, None],  # [b, H, 1, D]
            k.to(q.dtype).transpose(1, 2),
            v.to(q.dtype).transpose(1, 2),
            attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype),
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        return out[:, :, 0]
    return _block_diagonal_decode(q, k.to(q.dtype), v.to(q.dtype), mask, scale)


def _block_diagonal_decode(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """The matmul path (see the module doc): keys and values read as gathered, [b, T, H_kv x D]
    rows, against block-diagonal queries [b, H, H_kv x D]."""
    batch, num_heads, head_dim = q.shape
    width, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    # Query head h = kv * group + g keeps its D values under KV head kv's columns, zeros elsewhere.
    queries = q.new_zeros(batch, num_kv_heads, group, num_kv_heads, head_dim)
    diagonal = queries.diagonal(dim1=1, dim2=3)  # [b, group, D, H_kv]: the KV head's own block
    diagonal.copy_((q * scale).view(batch, num_kv_heads, group, head_dim).permute(0, 2, 3, 1))
    rows = queries.view(batch, num_heads, num_kv_heads * head_dim)
    scores = torch.bmm(rows, k.reshape(batch, width, -1).transpose(1, 2))  # [b, H, T]
    if mask is not None:
        mask = mask.reshape(mask.shape[0], mask.shape[1], width)  # [b | 1, H | 1, T]
        if mask.dtype == torch.bool:  # every row sees at least its own key
            # A hidden key's score is replaced, not added to: stale NaN keys are harmless.
            scores = torch.where(mask, scores, float("-inf"))
        else:
            scores = scores.float() + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs, v.reshape(batch, width, -1))  # [b, H, H_kv x D]: keep the diagonal
    blocks = out.view(batch, num_kv_heads, group, num_kv_heads, head_dim)
    return blocks.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(q.shape)
