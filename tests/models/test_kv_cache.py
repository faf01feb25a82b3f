"""Paged KV pool: byte accounting, allocation, and worst-case block counts."""

from __future__ import annotations

import pytest
import torch

from exegpt.models.defaults import default_model_config
from exegpt.models.kv_cache import (
    KVCacheFull,
    KVCachePool,
    KVCacheSpec,
    SequenceKV,
    num_blocks_needed,
)
from exegpt.models.loader import LoadedModel
from tests.models.conftest import Checkpoint
from tests.models.helpers import make_runner

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def storage_bytes(pool: KVCachePool) -> int:
    return sum(t.numel() * t.element_size() for layer in pool.layers for t in (layer.k, layer.v))


def test_bytes_match_storage() -> None:
    assert SPEC.bytes_per_token() == 2 * 3 * 2 * 8 * 2
    pool = KVCachePool(SPEC, num_blocks=5, block_size_tokens=4)
    assert pool.bytes_per_block == SPEC.bytes_per_token() * 4
    assert pool.capacity_bytes == 5 * pool.bytes_per_block
    # Plus the null slot that reads past a sequence's end go to.
    assert storage_bytes(pool) == pool.capacity_bytes + SPEC.bytes_per_token()
    assert pool.layers[0].k.shape == (21, 2, 8) and pool.null_slot == 20
    assert pool.used_bytes == 0


def test_for_memory_fits_budget() -> None:
    budget = 10_000
    pool = KVCachePool.for_memory(SPEC, budget, block_size_tokens=4)
    assert storage_bytes(pool) <= budget < storage_bytes(pool) + pool.bytes_per_block
    assert storage_bytes(pool) <= budget
    with pytest.raises(ValueError, match="cannot hold one KV block"):
        KVCachePool.for_memory(SPEC, pool.bytes_per_block, block_size_tokens=4)


def test_spec_for_model() -> None:
    spec = KVCacheSpec.for_model(default_model_config(), dtype=torch.bfloat16)
    assert spec == KVCacheSpec(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)


def test_allocate_free_and_full() -> None:
    pool = KVCachePool(SPEC, num_blocks=4, block_size_tokens=4)
    first = pool.allocate(3)
    assert len(set(first)) == 3 and pool.num_free_blocks == 1
    assert pool.used_bytes == 3 * pool.bytes_per_block
    with pytest.raises(KVCacheFull):
        pool.allocate(2)
    assert pool.num_free_blocks == 1  # a failed allocation takes nothing
    pool.free(first[:2])
    assert pool.num_free_blocks == 3
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([first[0]])
    with pytest.raises(ValueError, match="duplicate"):
        pool.free([first[2], first[2]])
    assert pool.allocate(0) == []
    pool.free([first[2]])
    assert pool.used_bytes == 0 and pool.num_free_blocks == 4


@pytest.mark.parametrize("variant", ["t5", "llama"])
@pytest.mark.parametrize("num_new", [1, 4, 5, 9])
def test_num_blocks_needed_is_exact(
    checkpoints: dict[str, Checkpoint], variant: str, num_new: int
) -> None:
    """A request that generates num_new tokens holds exactly the predicted worst case."""
    loaded = checkpoints[variant].loaded
    runner = make_runner(loaded, num_blocks=32, block_size=4)
    prompt = list(range(3, 10))  # 7 tokens
    seq = SequenceKV()
    token = int(runner.prefill([seq], [prompt]).argmax())
    for _ in range(num_new - 1):
        token = int(runner.decode([seq], [token]).argmax())
    held = len(seq.self_blocks) + len(seq.cross_blocks)
    assert held == num_blocks_needed(loaded.config, len(prompt), num_new, 4)
    assert runner.pool.num_free_blocks == 32 - held
    runner.release(seq)
    assert runner.pool.num_free_blocks == 32 and seq.self_blocks == seq.cross_blocks == []


def test_num_blocks_needed_values() -> None:
    config = default_model_config()  # T5: cross blocks for the prompt, self blocks for outputs
    assert num_blocks_needed(config, 16, 16, 16) == 2
    assert num_blocks_needed(config, 17, 1, 16) == 3


def test_prefill_that_does_not_fit_allocates_nothing(default_loaded: LoadedModel) -> None:
    runner = make_runner(default_loaded, num_blocks=3, block_size=4)
    seqs = [SequenceKV(), SequenceKV()]
    with pytest.raises(KVCacheFull):
        runner.prefill(seqs, [[5] * 4, [6] * 4])  # needs 2 cross + 2 self blocks
    assert runner.pool.num_free_blocks == 3
    assert seqs[0] == SequenceKV() and seqs[1] == SequenceKV()


def test_decode_that_does_not_fit_allocates_nothing(default_loaded: LoadedModel) -> None:
    runner = make_runner(default_loaded, num_blocks=4, block_size=1)
    seqs = [SequenceKV(), SequenceKV()]
    runner.prefill(seqs, [[5], [6]])  # 1 cross + 1 self block each
    with pytest.raises(KVCacheFull):
        runner.decode(seqs, [7, 8])
    assert runner.pool.num_free_blocks == 0
    assert [s.num_self_tokens for s in seqs] == [1, 1]
    runner.release(seqs[1])
    runner.decode(seqs[:1], [7])  # the freed blocks let the other sequence go on
    assert seqs[0].num_self_tokens == 2
