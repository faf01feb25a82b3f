"""T5's decoder position bias read from a table by distance (layers.causal_distance_bias,
t5.PositionTables.decoder_by_distance) equals the bucketed bias it replaces, and follows its
weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import exegpt.models.paged_decode as native
from exegpt.models.attention import mask_value
from exegpt.models.layers import causal_distance_bias, relative_position_bias
from exegpt.models.t5 import PositionTables

MAX_DISTANCE = 128


def test_the_distance_table_reads_the_bucketed_bias_at_every_distance() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(32, 4)
    # Queries before, at and far past max_distance; keys before and after each query.
    queries = torch.tensor([[0], [5], [127], [128], [129], [700]])
    keys = torch.arange(900)[None]
    bucketed = relative_position_bias(table, queries, keys, False, MAX_DISTANCE)  # [B, H, 1, T]
    by_distance = causal_distance_bias(table, MAX_DISTANCE)  # [D, H]
    read = F.embedding((queries - keys).clamp(0, MAX_DISTANCE), by_distance)  # [B, T, H]
    assert by_distance.shape == (MAX_DISTANCE + 1, 4)
    assert torch.equal(read.transpose(1, 2)[:, :, None], bucketed)


def test_the_decoders_table_has_a_hidden_row_and_follows_its_weights() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(32, 4).to(torch.bfloat16)
    tables = PositionTables(None, table)
    first = tables.decoder_by_distance(MAX_DISTANCE, None)
    assert first.dtype == torch.bfloat16 and first.shape == (MAX_DISTANCE + 2, 4)
    assert torch.equal(first[:-1], causal_distance_bias(table, MAX_DISTANCE))
    assert (first[-1] == mask_value(torch.bfloat16)).all()
    assert tables.decoder_by_distance(MAX_DISTANCE, None) is first  # made once
    as_float = tables.decoder_by_distance(MAX_DISTANCE, torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, first.float())
    with torch.no_grad():
        table.weight.add_(1.0)  # loading weights in place bumps their version
    again = tables.decoder_by_distance(MAX_DISTANCE, None)
    assert torch.equal(again[:-1], causal_distance_bias(table, MAX_DISTANCE))
    assert not torch.equal(again, first)
    with pytest.raises(ValueError, match="no position table"):
        PositionTables(table, None).decoder_by_distance(MAX_DISTANCE, None)


def test_a_bias_is_built_in_float32_only_for_a_pool_the_kernel_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = torch.zeros(16, 2, 8, dtype=torch.bfloat16)
    assert native.library() is not None  # this machine builds it (test_paged_decode.py)
    assert native.bias_dtype(pool) == torch.float32
    assert native.bias_dtype(None) is None
    assert native.bias_dtype(pool.float()) is None  # float32 keeps SDPA: the model's dtype
    assert native.bias_dtype(pool.transpose(0, 1)) is None  # the kernel reads contiguous pools
    monkeypatch.setenv("EXEGPT_NATIVE_DECODE", "0")
    assert native.bias_dtype(pool) is None
