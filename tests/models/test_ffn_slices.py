"""A host feed-forward runs in row slices whose intermediate stays under glibc's mmap
threshold, with the output of the whole computation."""

from __future__ import annotations

import pytest
import torch

from exegpt.models.layers import (
    FFN_MAX_INTERMEDIATE_BYTES,
    GatedGeluFFN,
    ReluFFN,
    ffn_rows_per_slice,
)


@pytest.mark.parametrize("ffn_class", [ReluFFN, GatedGeluFFN])
def test_a_large_input_is_sliced_and_gives_the_whole_output(ffn_class) -> None:
    torch.manual_seed(0)
    ffn = ffn_class(64, 1024)
    x = torch.randn(3, 3000, 64)  # 9,000 rows: a 36 MiB intermediate whole
    rows = ffn_rows_per_slice(x, 1024)
    assert rows == FFN_MAX_INTERMEDIATE_BYTES // (1024 * 4) == 4096
    with torch.inference_mode():
        sliced = ffn(x)
        whole = ffn._forward(x)
    assert sliced.shape == whole.shape == (3, 3000, 64)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


def test_a_small_input_or_one_off_the_host_is_run_whole() -> None:
    assert ffn_rows_per_slice(torch.empty(100, 64), 1024) == 100
    assert ffn_rows_per_slice(torch.empty(9000, 64, device="meta"), 1024) == 9000
    # bf16 halves the bytes of a row: twice the rows per slice.
    assert ffn_rows_per_slice(torch.empty(9000, 64, dtype=torch.bfloat16), 1024) == 8192
