"""Packed steps (decoder-only, and the T5 encoder): no projection sees padding, decode buckets
(of packed steps and of T5's decode steps) bound their padding, and one step that mixes a
fresh prefill, a prefill chunk and decodes gives each row the logits it gets when its whole
sequence is prefilled alone."""

from __future__ import annotations

import pytest
import torch

import exegpt.models.decode_buckets as buckets
from exegpt.models.decode_attention import decode_kernel
from exegpt.models.decode_buckets import padded_decode_buckets
from exegpt.models.kv_cache import SequenceKV
from exegpt.models.loader import load_model
from exegpt.models.packed import packed_layout
from tests.models.conftest import Checkpoint
from tests.models.helpers import assert_logits_close, decode_logits, make_runner

FAMILIES = ["llama", "mistral-window", "qwen2"]


@pytest.mark.parametrize(("variant", "stack"), [("llama", "decoder"), ("t5", "encoder")])
def test_prefill_projections_see_only_the_valid_tokens(
    checkpoints: dict[str, Checkpoint], variant: str, stack: str
) -> None:
    """Llama: every step is packed; T5: its encoder is (its decoder starts from one token)."""
    runner = make_runner(checkpoints[variant].loaded)
    layer = getattr(runner.model, f"{stack}_layers")[0]
    seen: list[torch.Size] = []
    ffn = layer.mlp if variant == "llama" else layer.ffn
    hook = ffn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    prompts = [[5] * 3, [6] * 17, [7] * 5]
    seqs = [SequenceKV() for _ in prompts]
    try:
        runner.prefill(seqs, prompts)
        runner.decode(seqs, [1, 2, 3])
    finally:
        hook.remove()
    # 25 prompt tokens, not 3 rows padded to 17 (51); then one token per sequence.
    expected = [(1, 25), (1, 3)] if variant == "llama" else [(1, 25)]
    assert [shape[:2] for shape in seen] == expected


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize(("padding", "min_padding"), [(0.0, 0), (0.25, 0), (0.5, 0), (0.0, 32)])
@pytest.mark.parametrize("step", ["packed", "padded"])
def test_decode_buckets_hold_every_row_once_within_the_padding_bound(
    padding: float, min_padding: int, block_size: int, step: str
) -> None:
    """Each row's blocks are its own, in order; the mask shows exactly its keys; a row pads
    to at most a share `padding` of its bucket's width, or `min_padding` keys. A padded step
    (T5) gives its rows' slots as [B, T_max], padded with a null slot."""
    kv_lengths = [100, 9, 90, 10, 76, 60, 1, 75]
    positions = torch.tensor([n - 1 for n in kv_lengths])  # one new token each
    query_starts = torch.arange(len(kv_lengths) + 1)
    # Row b's blocks are 1000 + 10 b + j: every key's slot follows from its row and position.
    table = [
        [1000 + 10 * b + j for j in range(-(-n // block_size))] for b, n in enumerate(kv_lengths)
    ]
    read_slots = torch.tensor(
        [
            table[b][p // block_size] * block_size + p % block_size
            for b, n in enumerate(kv_lengths)
            for p in range(n)
        ]
    )
    if step == "packed":
        layout = packed_layout(
            query_starts, positions, read_slots, None, padding, block_size, min_padding
        )
        assert layout.groups == ()
        buckets = layout.buckets
    else:
        null_slot = 99_999
        rows = read_slots.split(kv_lengths)
        width = max(kv_lengths)
        padded = torch.stack(
            [torch.cat([r, r.new_full((width - len(r),), null_slot)]) for r in rows]
        )
        buckets = padded_decode_buckets(padded, kv_lengths, block_size, padding, min_padding)
    queries = sorted(q for b in buckets for q in b.query_index.tolist())
    assert queries == list(range(len(kv_lengths)))
    for bucket in buckets:
        width = bucket.key_blocks.shape[1] * block_size
        for row, b in enumerate(bucket.query_index.tolist()):
            own = len(table[b])
            assert bucket.key_blocks[row, :own].tolist() == table[b]
            assert set(bucket.key_blocks[row, own:].tolist()) <= {table[b][-1]}
            within_share = kv_lengths[b] >= (1 - padding) * width - block_size + 1
            within_keys = kv_lengths[b] >= width - block_size + 1 - min_padding
            assert within_share or within_keys
            if bucket.mask is not None:
                assert bucket.mask[row, 0, 0].tolist() == [p < kv_lengths[b] for p in range(width)]
            else:
                assert kv_lengths[b] == width
    rows = sorted(sorted(bucket.query_index.tolist()) for bucket in buckets)
    if padding == 0.0 and min_padding == 0:  # no padding at all: one bucket per distinct length
        assert len(buckets) == len(set(kv_lengths))
    if min_padding == 32:  # 100, 90, 76, 75 (<= 32 keys short); 60 alone; 10, 9, 1
        assert rows == [[0, 2, 4, 7], [1, 3, 6], [5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_t5_decode_reads_each_rows_own_keys_only(
    checkpoints: dict[str, Checkpoint], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A T5 decode step with one long prompt among short ones: its cross-attention reads within
    the bucket bound of each row's own encoder length, not every row padded to the longest.
    (The torch path: the native kernel reads each row's own keys exactly, as
    tests/models/test_paged_decode.py checks.)"""
    monkeypatch.setenv("EXEGPT_NATIVE_DECODE", "0")
    loaded = load_model(str(checkpoints["t5"].path), dtype=dtype)
    runner = make_runner(loaded, block_size=4)
    prompts = [[5] * 3, [6] * 200, [7] * 5, [8] * 6]
    seqs = [SequenceKV() for _ in prompts]
    last = runner.prefill(seqs, prompts).argmax(-1).tolist()
    widths: list[tuple[int, int]] = []  # (rows, keys) of each attention call
    real_kernel = buckets.decode_kernel

    def recording_kernel(q, k, v, mask, scale):  # the real kernel, its shapes noted
        widths.append((k.shape[0], k.shape[1]))
        return real_kernel(q, k, v, mask, scale)

    monkeypatch.setattr(buckets, "decode_kernel", recording_kernel)
    runner.decode(seqs, last)
    num_layers = loaded.config.num_decoder_layers
    keys_read = sum(rows * keys for rows, keys in widths) // num_layers
    # Self-attention: one bucket of 4 rows x one block. Cross: 200 alone (over the padding
    # bounds: 25% and 128 keys), 3, 5 and 6 in one bucket of two blocks (not 4 rows x 200 keys).
    assert keys_read == 4 * 4 + (200 + 3 * 8)


@pytest.mark.parametrize("variant", FAMILIES)
def test_a_mixed_step_equals_each_sequence_prefilled_alone(
    checkpoints: dict[str, Checkpoint], variant: str
) -> None:
    """Rows: two decodes (KV 11 and 3), the second chunk of a 13-token prompt, a fresh prompt;
    each row's logits equal those of its whole sequence prefilled alone."""
    runner = make_runner(checkpoints[variant].loaded)
    model, pool, builder = runner.model, runner.pool, runner.builder
    long_prompt = [(3 * j) % 90 + 4 for j in range(13)]
    fresh = [40, 41, 42, 43, 44]

    def run(seqs: list[SequenceKV], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        ends = [s + len(t) for s, t in zip(starts, tokens, strict=True)]
        pool.allocator.grow(seqs, pool.block_size_tokens, ends, None)
        with torch.inference_mode():
            logits = model.decode(builder.packed(seqs, tokens, starts), pool.layers)
        for seq, end in zip(seqs, ends, strict=True):
            seq.num_self_tokens = end
        return logits

    def prepared() -> list[SequenceKV]:
        """Two sequences prefilled (11 and 3 tokens) and the long prompt's first chunk."""
        seqs = [SequenceKV() for _ in range(4)]
        run(seqs[:2], [list(range(10, 21)), [7, 8, 9]], [0, 0])
        run(seqs[2:3], [long_prompt[:6]], [0])
        return seqs

    inputs = [[*range(10, 21), 50], [7, 8, 9, 51], long_prompt, fresh]
    alone = []
    for tokens in inputs:  # each whole, in a prefill of its own
        seq = SequenceKV()
        alone.append(run([seq], [tokens], [0])[0])
        runner.release(seq)

    seqs = prepared()
    mixed = run(seqs, [[50], [51], long_prompt[6:], fresh], [11, 3, 6, 0])
    for got, want in zip(mixed, alone, strict=True):
        assert_logits_close(got, want)


def test_prefill_rows_of_the_same_shape_share_one_kernel_call() -> None:
    query_starts = torch.tensor([0, 5, 12, 17, 22])  # rows of 5, 7, 5 and 5 tokens
    layout = packed_layout(query_starts, torch.zeros(4, dtype=torch.long), None, None)
    shapes = sorted(tuple(group.query_index.shape) for group in layout.groups)
    assert shapes == [(1, 7), (3, 5)]
    for group in layout.groups:
        for index in group.query_index.tolist():  # each row's tokens, in order
            assert index == list(range(index[0], index[0] + len(index)))
    assert sorted(g.query_index[:, 0].tolist() for g in layout.groups) == [[0, 12, 17], [5]]
    assert layout.last_tokens.tolist() == [4, 11, 16, 21]  # each row's last token


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_attends_to_the_visible_keys_only(dtype: torch.dtype, additive: bool) -> None:
    """Grouped queries (12 heads over 4 KV heads), rows of different lengths: each row's output
    is the float32 softmax attention over its own visible keys, within the dtype's rounding;
    the hidden keys (filled with huge values) change nothing. The mask is SDPA's bool one, or
    additive with a per-head bias (as T5's position bias plus its length mask)."""
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, width = 5, 12, 4, 16, 9
    q = torch.randn(rows, heads, dim, generator=generator)
    k = torch.randn(rows, width, kv_heads, dim, generator=generator)
    v = torch.randn(rows, width, kv_heads, dim, generator=generator)
    lengths = torch.tensor([9, 1, 4, 7, 9])
    visible = torch.arange(width)[None] < lengths[:, None]  # [rows, width]
    k[~visible], v[~visible] = 1e4, 1e4
    bias = torch.zeros(rows, heads, 1, width)
    mask: torch.Tensor = visible[:, None, None]  # [rows, 1, 1, width]
    if additive:
        bias = torch.randn(rows, heads, 1, width, generator=generator)
        mask = bias.masked_fill(~mask, torch.finfo(torch.float32).min)
    got = decode_kernel(q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.25)
    assert got.dtype == dtype and got.shape == (rows, heads, dim)
    for row, length in enumerate(lengths.tolist()):
        keys = k[row, :length].repeat_interleave(heads // kv_heads, dim=1)  # [T, H, D]
        values = v[row, :length].repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[row], keys) * 0.25 + bias[row, :, 0, :length]
        want = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got[row].float(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("variant", ["llama", "t5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stale_non_finite_kv_in_reused_blocks_reaches_no_request(
    checkpoints: dict[str, Checkpoint], variant: str, dtype: torch.dtype
) -> None:
    """Every slot of the pool starts as NaN (what a freed block of a failed request may hold):
    decode steps over rows of different lengths, whose last blocks are partly unwritten, give
    the logits of a clean pool."""
    loaded = load_model(str(checkpoints[variant].path), dtype=dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30 + j for j in range(13)]]

    poisoned = decode_logits(loaded, prompts, poisoned=True)
    assert torch.isfinite(poisoned).all()
    clean = decode_logits(loaded, prompts, poisoned=False)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@pytest.mark.parametrize("variant", FAMILIES)
def test_stale_non_finite_kv_reaches_no_prefill_chunk(
    checkpoints: dict[str, Checkpoint], variant: str
) -> None:
    """Two 13-token prompts prefilled in step, in chunks of 5, 5 and 3, over a pool of NaN
    (4-token blocks: each chunk's keys end inside a block whose tail is unwritten) give the
    logits of a clean pool. Each chunk reads its prefix and itself by whole blocks; the two
    rows of a chunk step are one group, so the second row's tail sits one row further on."""
    loaded = checkpoints[variant].loaded
    prompts = [[(3 * j) % 90 + 4 for j in range(13)], [(7 * j) % 90 + 5 for j in range(13)]]

    def chunked_logits(poisoned: bool) -> torch.Tensor:
        runner = make_runner(loaded)
        pool, builder = runner.pool, runner.builder
        if poisoned:
            for layer in pool.layers:
                layer.k[:-1].fill_(float("nan"))  # all but the pool's null slot
                layer.v[:-1].fill_(float("nan"))
        seqs = [SequenceKV() for _ in prompts]
        logits = []
        for start, end in [(0, 5), (5, 10), (10, 13)]:
            pool.allocator.grow(seqs, pool.block_size_tokens, [end] * len(seqs), None)
            with torch.inference_mode():
                chunks = [prompt[start:end] for prompt in prompts]
                batch = builder.packed(seqs, chunks, [start] * len(seqs))
                logits.append(runner.model.decode(batch, pool.layers))  # [2, vocab]
            for seq in seqs:
                seq.num_self_tokens = end
        return torch.stack(logits)

    poisoned = chunked_logits(poisoned=True)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, chunked_logits(poisoned=False), rtol=0, atol=0)
