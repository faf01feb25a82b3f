"""Packed steps (decoder-only, and the T5 encoder): no projection sees padding, decode buckets
bound their padding, and one step that mixes a fresh prefill, a prefill chunk and decodes gives
each row the logits it gets when its whole sequence is prefilled alone."""

from __future__ import annotations

import pytest
import torch

from exegpt.models.kv_cache import SequenceKV
from exegpt.models.packed import packed_layout
from tests.models.conftest import Checkpoint
from tests.models.helpers import assert_logits_close, make_runner

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


@pytest.mark.parametrize("padding", [0.0, 0.25, 0.5])
def test_decode_buckets_hold_every_row_once_within_the_padding_bound(padding: float) -> None:
    kv_lengths = [100, 9, 90, 10, 76, 60, 1, 75]
    positions = torch.tensor([n - 1 for n in kv_lengths])  # one new token each
    query_starts = torch.arange(len(kv_lengths) + 1)
    read_slots = torch.arange(sum(kv_lengths)) + 1000
    layout = packed_layout(query_starts, positions, read_slots, None, padding)
    assert layout.groups == ()
    queries = sorted(q for b in layout.buckets for q in b.query_index.tolist())
    assert queries == list(range(len(kv_lengths)))
    starts = [sum(kv_lengths[:b]) for b in range(len(kv_lengths))]
    for bucket in layout.buckets:
        width = bucket.key_slots.shape[1]
        for row, b in enumerate(bucket.query_index.tolist()):
            assert kv_lengths[b] >= (1 - padding) * width
            valid = bucket.key_slots[row, : kv_lengths[b]] - 1000
            assert valid.tolist() == list(range(starts[b], starts[b] + kv_lengths[b]))
            if bucket.mask is not None:
                assert int(bucket.mask[row].sum()) == kv_lengths[b]
    if padding == 0.0:  # no padding at all: one bucket per distinct length
        assert len(layout.buckets) == len(set(kv_lengths))


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
