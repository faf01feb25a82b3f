"""Causal attention of fresh prompts (a prefill's rows attend to their own new tokens only),
in bfloat16 or float16 on a CPU, as batched matmuls over blocks of query tokens.

CPU `scaled_dot_product_attention`'s flash kernel in bfloat16 ran task-S-sized prompts
(128-512 tokens, 12 query heads over 4 KV heads of 64) at 31-36 GFLOP/s on one thread of the
development machine, no faster than in float32, while a bf16 bmm of the same scores ran at
~200: the flash kernel was ~19% of a packed Llama prefill's time. Here each block of
`QUERY_BLOCK` query tokens is two bf16 batched matmuls (scores over the keys up to the block's
last token, so the causal upper triangle is mostly skipped) and a float32 softmax; the query
heads of one KV head are the rows of one matmul (grouped-query attention without repeating
K/V). A block's scores stay in cache: the (prompt, KV head) rows are taken a few at a time,
at most `SCORES_BUDGET` score elements per block, so the scratch does not grow with the
number of equal-length prompts packed_layout groups into one call. Against flash (one thread,
bf16, that head shape; benchmarks/prefill_attention.py) it ran 1.15-1.9x faster for 1, 8
and 32 prompts of 256-1024 tokens and 1 and 8 of 128 (one cell, 1 prompt of 256, at 0.94x,
then 1.42x on a rerun), where all rows in one block fell to 0.69-0.93x at 32 prompts.
Prompts over `MAX_TOKENS` (beyond that measured range), or whose one row alone would overflow
the budget, keep SDPA.

Accuracy: the scores are rounded to the input dtype (bf16: 8 significant bits) before the
float32 softmax, as transformers' eager bf16 attention and the decode kernel
(decode_attention.py) round theirs, while flash keeps them in float32. A score s moves by up
to |s| x 2^-8 (half a bf16 unit), so a softmax weight's relative error grows with the size of
the row's logits, not one fixed rounding: against float32 attention (256 tokens, 12 query
heads over 4 KV heads of 64) the largest output error was 0.016 (flash 0.008) at logits of
std 1, 0.051 (flash 0.008) at std 4 and 0.25 (flash 0.016) at std 16.
tests/models/test_prefill_attention.py derives the bound from the logits and holds the kernel
to it. float32 and GPUs keep SDPA (float32 stays token-identical to transformers).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from exegpt.models.decode_attention import matmul_attention_applies

# Query tokens per block.
QUERY_BLOCK = 64
# Most score elements [rows, group x block, keys] one block computes at once (~8 bytes each:
# bf16 scores, their float32 softmax, bf16 weights): rows are taken a few at a time under it.
SCORES_BUDGET = 1 << 19
# Longest prompt the blocked path runs (the measured range); longer ones keep SDPA.
MAX_TOKENS = 1024


@functools.cache
def _hidden() -> Tensor:
    """Within a block, keys before its first token are all visible: only its own square is
    masked. Built on first use, not at import: any tensor op opens an OpenMP team on the
    importing thread (exegpt/compute_threads.py)."""
    return torch.ones(QUERY_BLOCK, QUERY_BLOCK, dtype=torch.bool).triu(1)


def matmul_prefill_applies(q: Tensor, num_kv_heads: int) -> bool:
    """Whether a causal prefill with queries `q` [b, T, H, D] over `num_kv_heads` KV heads takes
    the blocked matmul path: bf16/fp16 on a CPU, T within the measured range, and one row's
    block within the scores budget."""
    num_tokens, group = q.shape[1], q.shape[2] // num_kv_heads
    return (
        matmul_attention_applies(q)
        and num_tokens <= MAX_TOKENS
        and group * QUERY_BLOCK * num_tokens <= SCORES_BUDGET
    )


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
    out = torch.empty(rows, group, num_tokens, head_dim, dtype=q.dtype, device=q.device)
    step = max(1, SCORES_BUDGET // (group * QUERY_BLOCK * num_tokens))
    for first in range(0, rows, step):
        chunk = slice(first, min(rows, first + step))
        _attend_rows(queries[chunk], keys_t[chunk], values[chunk], out[chunk])
    out = out.view(batch, num_kv_heads, group, num_tokens, head_dim)
    return out.permute(0, 3, 1, 2, 4).reshape(q.shape)


def _attend_rows(queries: Tensor, keys_t: Tensor, values: Tensor, out: Tensor) -> None:
    """Causal attention of some rows, block by block of query tokens, into `out`: queries and
    out [rows, group, T, D] (already scaled), keys_t [rows, D, T], values [rows, T, D]."""
    rows, group, num_tokens, head_dim = queries.shape
    for start in range(0, num_tokens, QUERY_BLOCK):
        end = min(num_tokens, start + QUERY_BLOCK)  # keys 0..end-1 are all the block sees
        size = end - start
        block = queries[:, :, start:end].reshape(rows, group * size, head_dim)
        scores = torch.bmm(block, keys_t[:, :, :end]).view(rows, group, size, end)
        scores[..., start:].masked_fill_(_hidden()[:size, :size], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
        probs = probs.view(rows, group * size, end)
        out[:, :, start:end] = torch.bmm(probs, values[:, :end]).view(rows, group, size, head_dim)
