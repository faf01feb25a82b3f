"""A decode bucket whose gathered K/V would pass the heap's ceiling runs in row slices within
the budget (exegpt/models/gather_budget.py), cut once per step into the step's layout (not per
layer), and a sliced step gives the logits of a whole one, stale non-finite K/V in reused
blocks included."""

from __future__ import annotations

import pytest
import torch

import exegpt.models.decode_buckets as buckets
from exegpt.allocator import MMAP_THRESHOLD_BYTES
from exegpt.models.decode_buckets import DecodeBucket
from exegpt.models.gather_budget import DECODE_GATHER_MAX_BYTES, gathered_bytes, within_budget
from exegpt.models.loader import load_model
from exegpt.models.packed import packed_layout
from tests.models.conftest import Checkpoint
from tests.models.helpers import assert_logits_close, decode_logits


def _bucket(lengths: list[int], block_size: int) -> DecodeBucket:
    """Rows of `lengths` keys padded to the longest, the padding hidden (as decode_buckets cuts)."""
    width = -(-max(lengths) // block_size) * block_size
    visible = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return DecodeBucket(
        query_index=torch.arange(len(lengths)),
        key_blocks=torch.arange(len(lengths) * (width // block_size)).view(len(lengths), -1),
        mask=visible[:, None, None, :],
        hidden_keys=(~visible).flatten().nonzero().squeeze(1),
    )


def test_a_bucket_past_the_heap_ceiling_is_sliced_within_the_budget() -> None:
    """300 rows of up to 128 cross keys of the default model (4 heads x 64, float32): 37.5 MiB
    of K gathered at once, past glibc's mmap threshold; the slices each stay within the
    budget, cover every row once in order, and keep each row's visible keys."""
    lengths = [128 - (b % 90) for b in range(300)]
    bucket = _bucket(lengths, block_size=16)
    pool = torch.zeros(1, 4, 64)  # only its bytes per key are read
    assert gathered_bytes(bucket, 16, pool) > MMAP_THRESHOLD_BYTES
    slices = within_budget(bucket, 16, pool)
    assert len(slices) > 1
    assert all(gathered_bytes(s, 16, pool) <= DECODE_GATHER_MAX_BYTES for s in slices)
    assert torch.cat([s.query_index for s in slices]).tolist() == list(range(300))
    assert torch.equal(torch.cat([s.key_blocks for s in slices]), bucket.key_blocks)
    width = bucket.key_blocks.shape[1] * 16
    for part in slices:
        hidden = torch.zeros(len(part.query_index) * width, dtype=torch.bool)
        hidden[part.hidden_keys] = True
        rows = part.query_index.tolist()
        expected = torch.arange(width)[None] >= torch.tensor([lengths[b] for b in rows])[:, None]
        assert torch.equal(hidden.view(len(rows), width), expected)
        assert torch.equal(part.mask[:, 0, 0], ~expected)


def test_a_bucket_within_the_budget_stays_whole() -> None:
    bucket = _bucket([40, 33, 38], block_size=16)
    (whole,) = within_budget(bucket, 16, torch.zeros(1, 4, 64))
    assert whole is bucket


def test_a_pool_off_the_host_is_never_sliced() -> None:
    """The cliff is glibc's heap: a pool on another device (here `meta`, which allocates
    nothing) keeps the bucket whole at a budget that would cut a host pool into rows."""
    bucket = _bucket([40, 33, 38], block_size=16)
    assert len(within_budget(bucket, 16, torch.zeros(1, 4, 64), max_bytes=1)) == 3
    (whole,) = within_budget(bucket, 16, torch.zeros(1, 4, 64, device="meta"), max_bytes=1)
    assert whole is bucket


def _decode_layout(pool: torch.Tensor | None):
    """The packed layout of four decode rows of 40, 33, 38 and 36 keys in 16-token blocks
    (row b's slots 1000 b onwards): one bucket by the padding bounds."""
    kv_lengths = [40, 33, 38, 36]
    read_slots = torch.cat([torch.arange(1000 * b, 1000 * b + n) for b, n in enumerate(kv_lengths)])
    positions = torch.tensor([n - 1 for n in kv_lengths])
    return packed_layout(torch.arange(5), positions, read_slots, None, block_size=16, pool=pool)


def test_the_layout_carries_the_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's layout holds the budget's row slices, cut from its pool's bytes per key:
    every layer reuses them. Without a pool (or with one off the host) the bucket stays whole.
    """
    assert len(_decode_layout(torch.zeros(1, 4, 64)).buckets) == 1
    monkeypatch.setattr(buckets, "DECODE_GATHER_MAX_BYTES", 1)  # one row per slice
    sliced = _decode_layout(torch.zeros(1, 4, 64)).buckets
    assert [s.query_index.tolist() for s in sliced] == [[0], [2], [3], [1]]  # longest first
    for part, length in zip(sliced, [40, 38, 36, 33], strict=True):
        assert part.key_blocks.shape == (1, 3)
        assert part.mask[0, 0, 0].tolist() == [p < length for p in range(48)]
        assert part.hidden_keys.tolist() == list(range(length, 48))
    assert len(_decode_layout(None).buckets) == 1
    assert len(_decode_layout(torch.zeros(1, 4, 64, device="meta")).buckets) == 1


def _record_kernel_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every decode-kernel call from now on, in order."""
    rows_per_call: list[int] = []
    real_kernel = buckets.decode_kernel

    def recording_kernel(q, k, v, mask, scale):
        rows_per_call.append(k.shape[0])
        return real_kernel(q, k, v, mask, scale)

    monkeypatch.setattr(buckets, "decode_kernel", recording_kernel)
    return rows_per_call


@pytest.mark.parametrize("variant", ["llama", "t5"])
def test_a_decode_step_cuts_its_slices_once_not_per_layer(
    checkpoints: dict[str, Checkpoint], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer of a decode step attends the same slices, cut by one budget check per
    bucket of the step (T5: its self and its cross buckets), not one per layer."""
    loaded = load_model(str(checkpoints[variant].path))
    checks = 0
    real_within = buckets.within_budget

    def counting_within(*args, **kwargs):
        nonlocal checks
        checks += 1
        return real_within(*args, **kwargs)

    monkeypatch.setattr(buckets, "within_budget", counting_within)
    monkeypatch.setattr(buckets, "DECODE_GATHER_MAX_BYTES", 1)  # one row per slice
    rows_per_call = _record_kernel_rows(monkeypatch)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [40, 41]]
    decode_logits(loaded, prompts, poisoned=False, steps=1)
    layers = loaded.config.num_decoder_layers
    assert rows_per_call and set(rows_per_call) == {1}  # sliced to one row per call
    # one step of three short prompts is one bucket per attention kind, so one check each:
    # a per-layer cut would make `layers` times as many
    kinds = 2 if variant == "t5" else 1
    assert checks == kinds
    assert len(rows_per_call) == layers * kinds * len(prompts)


@pytest.mark.parametrize("variant", ["llama", "t5"])
def test_sliced_decode_steps_give_the_logits_of_whole_ones(
    checkpoints: dict[str, Checkpoint], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps over rows of different lengths in a pool whose every slot starts as NaN,
    with a budget of one row's K/V per slice, against the default budget: the same logits."""
    loaded = load_model(str(checkpoints[variant].path))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30 + j for j in range(13)], [40, 41]]
    rows_per_call = _record_kernel_rows(monkeypatch)

    whole = decode_logits(loaded, prompts, poisoned=True)
    assert max(rows_per_call) > 1  # the default budget attends the rows together
    rows_per_call.clear()
    monkeypatch.setattr(buckets, "DECODE_GATHER_MAX_BYTES", 1)  # one row per slice
    sliced = decode_logits(loaded, prompts, poisoned=True)
    assert rows_per_call and max(rows_per_call) == 1
    assert torch.isfinite(sliced).all()
    assert_logits_close(sliced, whole)
