"""Causal attention of fresh prompts (a prefill's rows attend to their own new tokens only),
in bfloat16 or float16 on a CPU, as batched matmuls over blocks of query tokens.

CPU `scaled_dot_product_attention`'s flash kernel in bfloat16 ran task-S-sized prompts
(128-512 tokens, 12 query heads over 4 KV heads of 64) at 31-36 GFLOP/s on one thread of the
development machine, no faster than in float32, while a bf16 bmm of the same scores ran at
~200: the flash kernel was ~19% of a packed Llama prefill's time. Here each block of
`QUERY_BLOCK` query tokens is two bf16 batched matmuls (scores over the keys up to the block's
last token, so the causal upper triangle is mostly skipped) and a float32 softmax, the scores
of a block staying in cache; the query heads of one KV head are the rows of one matmul
(grouped-query attention without repeating K/V). Measured on one thread (prompts of 256 and
512 tokens, that shape): 1.4x and 1.7x faster than flash; blocks of 64 and 128 tokens ran
alike, the whole square at once 2.5x slower than flash at 512 tokens (its float32 scores
leave the cache).

The scores are rounded to bf16 before the softmax (as the decode kernel's are,
decode_attention.py), so outputs differ from flash's by about one more bf16 rounding; the
bfloat16 tolerance against transformers (tests/models/test_bf16_equivalence.py) covers it.
float32 and GPUs keep SDPA (float32 stays token-identical to transformers).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Query tokens per block: each block's scores [heads, block, keys] fit in a core's cache.
QUERY_BLOCK = 64


def matmul_prefill_applies(q: Tensor) -> bool:
    """Whether a causal prefill with queries `q` takes the blocked matmul path."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def causal_prefill_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale, causal) v for rows of fresh prompts: q [b, T, H, D], k and v
    [b, T, H_kv, D] (query token t sees keys 0..t). Returns [b, T, H, D]."""
    batch, num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    rows = batch * num_kv_heads
    # [b x H_kv, group, T, D]: a KV head's query heads, then tokens, as matmul rows.
    queries = (q * scale).view(batch, num_tokens, num_kv_heads, group, head_dim)
    queries = queries.permute(0, 2, 3, 1, 4).reshape(rows, group, num_tokens, head_dim)
    keys_t = k.permute(0, 2, 3, 1).reshape(rows, head_dim, num_tokens)  # [b x H_kv, D, T]
    values = v.permute(0, 2, 1, 3).reshape(rows, num_tokens, head_dim)  # [b x H_kv, T, D]
    # Within a block, keys before its first token are all visible: only its own square (the
    # last columns) is masked, in place.
    hidden = torch.ones(QUERY_BLOCK, QUERY_BLOCK, dtype=torch.bool, device=q.device).triu(1)
    out = torch.empty(rows, group, num_tokens, head_dim, dtype=q.dtype, device=q.device)
    for start in range(0, num_tokens, QUERY_BLOCK):
        end = min(num_tokens, start + QUERY_BLOCK)  # keys 0..end-1 are all the block sees
        size = end - start
        block = queries[:, :, start:end].reshape(rows, group * size, head_dim)
        scores = torch.bmm(block, keys_t[:, :, :end]).view(rows, group, size, end)
        scores[..., start:].masked_fill_(hidden[:size, :size], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs.view(rows, group * size, end)
        out[:, :, start:end] = torch.bmm(probs, values[:, :end]).view(rows, group, size, head_dim)
    out = out.view(batch, num_kv_heads, group, num_tokens, head_dim)
    return out.permute(0, 3, 1, 2, 4).reshape(q.shape)
