"""The blocked causal prefill attention (bf16/fp16 on CPU) computes causal softmax attention:
each query token sees its own and earlier keys only, within bf16 rounding of float32, across
block boundaries, with grouped and plain multi-head attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exegpt.models import packed
from exegpt.models.prefill_attention import (
    QUERY_BLOCK,
    causal_prefill_attention,
    matmul_prefill_applies,
)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 causal attention by the definition: scores, mask, softmax, weighted sum."""
    group = q.shape[2] // k.shape[2]
    keys = k.float().repeat_interleave(group, dim=2)  # [b, T, H, D]
    values = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys) * scale
    tokens = q.shape[1]
    visible = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values)


@pytest.mark.parametrize("tokens", [2, QUERY_BLOCK, QUERY_BLOCK + 1, 3 * QUERY_BLOCK - 5])
@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 4), (8, 8)])
def test_blocked_prefill_attention_is_causal_attention(
    tokens: int, heads: int, kv_heads: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, dim, scale = 2, 16, 0.25
    q = torch.randn(batch, tokens, heads, dim, generator=generator).bfloat16()
    k = torch.randn(batch, tokens, kv_heads, dim, generator=generator).bfloat16()
    v = torch.randn(batch, tokens, kv_heads, dim, generator=generator).bfloat16()
    got = causal_prefill_attention(q, k, v, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.float(), _reference(q, k, v, scale), atol=3e-2, rtol=3e-2)


def test_a_later_key_changes_no_earlier_query() -> None:
    """Causality across blocks: overwriting the last token's K/V with huge values leaves every
    earlier token's output as it was, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    tokens = 2 * QUERY_BLOCK + 3
    q = torch.randn(1, tokens, 6, 8, generator=generator).bfloat16()
    k = torch.randn(1, tokens, 2, 8, generator=generator).bfloat16()
    v = torch.randn(1, tokens, 2, 8, generator=generator).bfloat16()
    before = causal_prefill_attention(q, k, v, 0.3)
    k[:, -1], v[:, -1] = 1e4, 1e4
    after = causal_prefill_attention(q, k, v, 0.3)
    assert torch.equal(after[:, :-1], before[:, :-1])
    assert not torch.equal(after[:, -1], before[:, -1])


def test_packed_prefill_takes_the_blocked_path_in_bf16_only() -> None:
    """The packed kernel uses it for fresh prompts in bf16 on CPU, SDPA in float32: both give
    causal attention."""
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(1, 70, 12, 16, generator=generator)
    k = torch.randn(1, 70, 4, 16, generator=generator)
    v = torch.randn(1, 70, 4, 16, generator=generator)
    want = _reference(q, k, v, 0.25)
    assert matmul_prefill_applies(q.bfloat16()) and not matmul_prefill_applies(q)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        args = (q.to(dtype), k.to(dtype), v.to(dtype))
        got = packed._kernel(*args, None, 0.25, True)
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)
    blocked = causal_prefill_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25)
    assert torch.equal(
        packed._kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25, True), blocked
    )
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.25,
        enable_gqa=True,
    )  # fmt: skip
    assert torch.equal(packed._kernel(q, k, v, None, 0.25, True), sdpa.transpose(1, 2))
