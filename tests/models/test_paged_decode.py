"""The native decode kernel (exegpt/models/paged_decode.py): attention read straight from the
paged pool equals float32 attention up to the output's bfloat16 rounding, reads only each row's
visible keys (stale NaN slots elsewhere are never touched), splits rows among threads without
changing a bit, serves the models' decode steps, and, where no compiler works, leaves the torch
path in charge with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import exegpt.models.decode_buckets as buckets
import exegpt.models.paged_decode as native
from exegpt.models.block_gather import gather_keys
from exegpt.models.decode_attention import decode_kernel
from exegpt.models.kv_cache import SequenceKV
from exegpt.models.loader import load_model
from tests.models.conftest import VARIANTS, Checkpoint
from tests.models.helpers import PROMPTS, decode_logits, make_runner
from tests.models.test_bf16_equivalence import MAX_GAP_OF_SCALE


def _case(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, lengths: list[int],
    window: int | None = None, seed: int = 0,
) -> dict:  # fmt: skip
    """A bfloat16 pool whose unread slots are NaN, rows of `lengths` keys in shuffled blocks,
    and each row's visible range (the last `window` keys of its length, or all of them)."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = -(-max(lengths) // block_size)
    total = len(lengths) * num_blocks + 3
    pool_k = torch.full((total * block_size, num_kv_heads, head_dim), float("nan"))
    pool_v = pool_k.clone()
    blocks = torch.randperm(total, generator=generator)[: len(lengths) * num_blocks]
    blocks = blocks.view(len(lengths), num_blocks)
    firsts = [max(0, n - window) if window else 0 for n in lengths]
    for row, (first, n) in enumerate(zip(firsts, lengths, strict=True)):
        for t in range(first, n):
            slot = int(blocks[row, t // block_size]) * block_size + t % block_size
            pool_k[slot] = torch.randn(num_kv_heads, head_dim, generator=generator)
            pool_v[slot] = torch.randn(num_kv_heads, head_dim, generator=generator)
    q = torch.randn(len(lengths), num_heads, head_dim, generator=generator)
    return {
        "q": q.to(torch.bfloat16),
        "k": pool_k.to(torch.bfloat16),
        "v": pool_v.to(torch.bfloat16),
        "blocks": blocks,
        "ranges": torch.tensor(list(zip(firsts, lengths, strict=True)), dtype=torch.int32),
        "block_size": block_size,
    }


def _reference(case: dict, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """float32 attention of the case's bf16 values over each row's visible keys."""
    q, k, v, bs = case["q"].float(), case["k"].float(), case["v"].float(), case["block_size"]
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for row, (first, last) in enumerate(case["ranges"].tolist()):
        slots = [int(case["blocks"][row, t // bs]) * bs + t % bs for t in range(first, last)]
        keys = k[slots].repeat_interleave(group, 1)  # [n, H, D]
        scores = torch.einsum("hd,nhd->hn", q[row], keys) * scale
        if bias is not None:
            scores = scores + bias[row, :, 0, first:last].float()
        weights = scores.softmax(-1)
        out[row] = torch.einsum("hn,nhd->hd", weights, v[slots].repeat_interleave(group, 1))
    return out


def _run(case: dict, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    return native.paged_decode(
        case["q"], case["k"], case["v"], case["blocks"], case["ranges"], bias,
        case["block_size"], scale,
    )  # fmt: skip


def test_the_kernel_builds_here() -> None:
    """CI and setup run where a C compiler works: the kernel must build, not fall back."""
    assert native.library() is not None


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size", "window"),
    [(8, 8, 64, 16, None), (12, 4, 64, 16, None), (4, 2, 24, 4, None), (6, 1, 32, 1, 5)],
)
@pytest.mark.parametrize("bias_heads", [0, 1, "H"])
def test_the_kernel_is_float32_attention_rounded_once(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, window: int | None,
    bias_heads: int | str,
) -> None:  # fmt: skip
    """MHA, GQA, a head size off the 16-wide vector (24), one-key blocks and a sliding window,
    rows of 1 to 70 keys, with no bias, one shared by the heads, or one per head: the output
    is float32 attention rounded once to bf16 (half a unit: 2^-9 relative), and no NaN slot
    outside a row's range reaches it."""
    case = _case(num_heads, num_kv_heads, head_dim, block_size, [70, 1, 33, 16, 17], window)
    bias = None
    if bias_heads:
        heads = num_heads if bias_heads == "H" else 1
        width = case["blocks"].shape[1] * block_size
        bias = torch.randn(5, heads, 1, width, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    out = _run(case, bias, scale)
    assert out.dtype == torch.bfloat16 and out.shape == case["q"].shape
    torch.testing.assert_close(out.float(), _reference(case, bias, scale), rtol=2**-8, atol=1e-6)


def test_the_kernel_is_closer_to_float32_than_the_gathered_path() -> None:
    """The torch path rounds its scores and weights to bf16 as well (decode_attention.py)."""
    case = _case(12, 4, 64, 16, [200, 150, 190, 120], seed=3)
    scale = 64**-0.5
    reference = _reference(case, None, scale)
    width = case["blocks"].shape[1] * 16
    visible = torch.arange(width)[None] < case["ranges"][:, 1:].long()
    keys, values = gather_keys(
        case["k"], case["v"], case["blocks"], (~visible).flatten().nonzero().squeeze(1), 16
    )
    gathered = decode_kernel(case["q"], keys, values, visible[:, None, None, :], scale)
    native_error = (_run(case, None, scale).float() - reference).abs().max()
    gathered_error = (gathered.float() - reference).abs().max()
    assert native_error < gathered_error


def test_an_indexed_call_reads_and_writes_its_rows_in_place() -> None:
    """Rows named by a query index read their queries from a larger q and write their outputs
    into `out` at those tokens, leaving every other token's row as it was: the same bits as
    gathering the queries, calling without an index and scattering the result."""
    case = _case(12, 4, 64, 16, [40, 3, 17, 64, 9], seed=7)
    tokens = torch.randn(9, 12, 64, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([6, 0, 8, 3, 1])  # a step's decode rows among its tokens, any order
    q = tokens.to(torch.bfloat16)
    q[index] = case["q"]
    bias = torch.randn(5, 12, 1, 64, generator=torch.Generator().manual_seed(3))
    out = torch.full_like(q, 7.0)
    returned = native.paged_decode(
        q, case["k"], case["v"], case["blocks"], case["ranges"], bias, 16, 0.125, index, out
    )
    assert returned is out
    assert torch.equal(out[index], _run(case, bias, 0.125))
    others = torch.ones(9, dtype=torch.bool)
    others[index] = False
    assert bool((out[others] == 7.0).all())
    with pytest.raises(ValueError, match="one index per row"):
        native.paged_decode(
            q, case["k"], case["v"], case["blocks"], case["ranges"], None, 16, 0.1, index[:4], out
        )


def test_rows_split_among_threads_give_the_same_bits() -> None:
    # Each row is one thread's alone, so the bits agree by construction; what this checks is
    # that the split (built with OpenMP here, as wherever gcc runs) reads and writes each
    # row's own memory.
    assert native.splits_rows()
    case = _case(12, 4, 64, 16, [90, 3, 47, 64, 1, 128, 33], seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = _run(case, None, 0.125)
        torch.set_num_threads(2)
        split = _run(case, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, split)


# t5-v1.1's gated-GELU layers at these spread weights amplify bf16 rounding past any useful
# bound (tests/models/test_bf16_equivalence.py leaves them out for the same reason).
BF16_VARIANTS = [v for v in VARIANTS if not v.startswith("t5-v1.1")]


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_a_bf16_decode_step_through_the_kernel_equals_the_gathered_path(
    checkpoints: dict[str, Checkpoint], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every family (T5's decoder position bias, grouped-query heads, a sliding window) decodes
    through the kernel to the logits of the gathered path within bf16 rounding; and a pool of
    NaN slots left by an earlier owner changes nothing."""
    loaded = load_model(str(checkpoints[variant].path), dtype=torch.bfloat16)
    calls = []
    real = buckets.paged_decode
    monkeypatch.setattr(buckets, "paged_decode", lambda *a: calls.append(a) or real(*a))
    through_kernel = decode_logits(loaded, PROMPTS, poisoned=False, steps=1).float()
    assert calls, "the bf16 decode step did not take the native kernel"
    poisoned = decode_logits(loaded, PROMPTS, poisoned=True, steps=1).float()
    monkeypatch.setenv("EXEGPT_NATIVE_DECODE", "0")
    gathered = decode_logits(loaded, PROMPTS, poisoned=False, steps=1).float()
    scale = float(gathered.abs().max())  # bf16 rounding, as test_bf16_equivalence.py bounds it
    torch.testing.assert_close(through_kernel, gathered, atol=MAX_GAP_OF_SCALE * scale, rtol=0)
    assert torch.equal(poisoned, through_kernel)


def test_the_kernel_reads_each_rows_own_keys(
    checkpoints: dict[str, Checkpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    """T5 with one long prompt among short ones: each row's cross-attention range is its own
    encoder length and its self-attention range its own tokens, whatever bucket it is in."""
    loaded = load_model(str(checkpoints["t5"].path), dtype=torch.bfloat16)
    runner = make_runner(loaded, block_size=4)
    prompts = [[5] * 3, [6] * 200, [7] * 5, [8] * 6]
    seqs = [SequenceKV() for _ in prompts]
    last = runner.prefill(seqs, prompts).argmax(-1).tolist()
    keys_read: list[int] = []
    real = buckets.paged_decode

    def recording(q, k, v, blocks, ranges, *rest):
        keys_read.append(int((ranges[:, 1] - ranges[:, 0]).sum()))
        return real(q, k, v, blocks, ranges, *rest)

    monkeypatch.setattr(buckets, "paged_decode", recording)
    runner.decode(seqs, last)
    per_layer = sum(keys_read) // loaded.config.num_decoder_layers
    assert per_layer == 4 * 2 + (3 + 200 + 5 + 6)  # self: the start token's key and the new one


def test_without_a_compiler_the_torch_path_serves(
    checkpoints: dict[str, Checkpoint],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No compiler: one warning, the kernel reported unavailable, and decode still runs (the
    gathered path), giving what EXEGPT_NATIVE_DECODE=0 gives."""
    loaded = load_model(str(checkpoints["llama"].path), dtype=torch.bfloat16)
    monkeypatch.setenv("EXEGPT_NATIVE_DECODE", "0")
    expected = decode_logits(loaded, PROMPTS, poisoned=False)
    monkeypatch.delenv("EXEGPT_NATIVE_DECODE")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("EXEGPT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.library() is None
        assert not native.reads_the_pool(torch.zeros(1, 1, 1, dtype=torch.bfloat16),
                                         torch.zeros(1, 1, 1, dtype=torch.bfloat16))  # fmt: skip
        assert torch.equal(decode_logits(loaded, PROMPTS, poisoned=False), expected)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "could not be built" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeError, match="not built"):
        _run(_case(2, 2, 16, 4, [3]), None, 1.0)


def test_a_built_kernel_is_reused_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXEGPT_KERNEL_CACHE", str(tmp_path))
    first = native._build()
    built_ns = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == built_ns
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left behind


def test_a_portable_build_attends_the_same(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Built for any x86-64 (no AVX512: the C fallbacks of every vectorised loop), the kernel
    gives the native build's attention within float32 summation order and one bf16 rounding."""
    case = _case(12, 4, 40, 16, [70, 1, 33, 16, 17], window=50, seed=7)
    bias = torch.randn(5, 12, 1, 80, generator=torch.Generator().manual_seed(2))
    tuned = _run(case, bias, 0.2)
    portable_flags = tuple(f for f in native._FLAGS if not f.startswith("-march"))
    monkeypatch.setattr(native, "_FLAGS", portable_flags)
    monkeypatch.setenv("EXEGPT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    portable = _run(case, bias, 0.2)
    torch.testing.assert_close(portable.float(), tuned.float(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(portable.float(), _reference(case, bias, 0.2), rtol=2**-8, atol=1e-6)
