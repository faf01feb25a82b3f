"""The blocked causal prefill attention (bf16/fp16 on CPU) computes causal softmax attention:
each query token sees its own and earlier keys only, within bf16 rounding of float32 (a bound
derived from the logits' size), across block boundaries and row chunks, with grouped and plain
multi-head attention, its softmax in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exegpt.models import packed, prefill_attention
from exegpt.models.prefill_attention import (
    MAX_TOKENS,
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
    assert matmul_prefill_applies(q.bfloat16(), 4) and not matmul_prefill_applies(q, 4)
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


def _rounding_bound(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per output element, the most bf16 rounding can move the kernel from float32 attention
    [b, T, H, D] (first principles; the inputs are bf16 already and `scale` a power of two).

    Each score s is rounded once, |error| <= u |s| with u = 2^-8 (half a bf16 unit): with
    delta = u x max_j |s_j| over a query's visible keys, each softmax weight moves by a factor
    within [e^-2delta, e^2delta], then is rounded (1 + u), so the weighted sum moves by at
    most ((1 + u) e^2delta - 1) sum_j p_j |v_j|; the output's own rounding adds u |o|."""
    u = 2.0**-8
    group = q.shape[2] // k.shape[2]
    keys = k.float().repeat_interleave(group, dim=2)
    values = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys) * scale
    tokens = q.shape[1]
    visible = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    delta = u * scores.abs().masked_fill(~visible, 0).amax(-1)  # [b, H, T]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    spread = torch.einsum("bhqk,bkhd->bqhd", probs, values.abs())
    factor = ((1 + u) * torch.exp(2 * delta) - 1).permute(0, 2, 1)[..., None]  # [b, T, H, 1]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, values)
    return factor * spread + u * (out.abs() + factor * spread) + 1e-5  # + float32 sums


@pytest.mark.parametrize("logit_std", [1.0, 4.0])
def test_error_stays_within_the_bound_of_bf16_scores(logit_std: float) -> None:
    """A realistic shape (12 query heads over 4 KV heads of 64, 256 tokens) at logits of std 1
    and 4: every output within the rounding bound, which grows with the logits' size."""
    generator = torch.Generator().manual_seed(3)
    scale = 0.125  # 64^-0.5, exact in bf16
    # q.k over 64 dims of unit-variance entries has std 8, times `scale`: std 1; q scaled up.
    q = (logit_std * torch.randn(1, 256, 12, 64, generator=generator)).bfloat16()
    k = torch.randn(1, 256, 4, 64, generator=generator).bfloat16()
    v = torch.randn(1, 256, 4, 64, generator=generator).bfloat16()
    error = (causal_prefill_attention(q, k, v, scale).float() - _reference(q, k, v, scale)).abs()
    bound = _rounding_bound(q, k, v, scale)
    assert bool((error <= bound).all()), float((error - bound).max())
    # The bound is tied to the scale: at std 4 it allows several times std 1's error.
    assert float(error.max()) > 2.0**-8


def test_softmax_runs_in_float32() -> None:
    """Equal scores over up to 600 keys: float32 weights 1/(t+1), each rounded once to bf16
    (relative error < 2^-8), so with values of 1 every output is within 2^-8 of 1 after its
    own rounding (1 - 2^-8 and 1 + 2^-7 are the bf16 neighbours of 1). Exponentials and a
    normalisation in bf16 round the weights twice more and reach 2^-7."""
    tokens = 600
    q = torch.zeros(1, tokens, 12, 64, dtype=torch.bfloat16)
    k = torch.randn(1, tokens, 4, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    v = torch.ones(1, tokens, 4, 64, dtype=torch.bfloat16)
    out = causal_prefill_attention(q, k, v, 0.125)
    assert float((out.float() - 1).abs().max()) <= 2.0**-8


def test_rows_taken_a_few_at_a_time_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scores budget of one row per block gives the very outputs of all rows at once."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(3, 2 * QUERY_BLOCK + 7, 12, 16, generator=generator).bfloat16()
    k = torch.randn(3, 2 * QUERY_BLOCK + 7, 4, 16, generator=generator).bfloat16()
    v = torch.randn(3, 2 * QUERY_BLOCK + 7, 4, 16, generator=generator).bfloat16()
    whole = causal_prefill_attention(q, k, v, 0.25)
    monkeypatch.setattr(prefill_attention, "SCORES_BUDGET", 1)
    assert torch.equal(causal_prefill_attention(q, k, v, 0.25), whole)


def test_long_prompts_and_wide_groups_keep_sdpa() -> None:
    """Beyond the measured length, or with one row's block over the budget, SDPA runs."""
    q = torch.zeros(1, MAX_TOKENS, 12, 8, dtype=torch.bfloat16)
    assert matmul_prefill_applies(q, 4) and matmul_prefill_applies(q.half(), 4)
    assert not matmul_prefill_applies(torch.zeros(1, MAX_TOKENS + 1, 12, 8).bfloat16(), 4)
    # 12 query heads over one KV head: one row's block is 12 x 64 x 1024 scores, over budget.
    assert 12 * QUERY_BLOCK * MAX_TOKENS > prefill_attention.SCORES_BUDGET
    assert not matmul_prefill_applies(q, 1)
    assert not matmul_prefill_applies(q.float(), 4)
