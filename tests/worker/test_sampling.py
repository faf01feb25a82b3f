import math

import torch

from services.worker.sampling import (
    RowSampling,
    rows_from_tensors,
    sample_rows,
    sampling_tensors,
)


def row(temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, index: int = 0) -> RowSampling:
    return RowSampling(temperature, top_p, seed, index)


def test_greedy_takes_argmax_per_row() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample_rows(logits, [row(), row()]).token_ids == [1, 0]


def test_seeded_sampling_is_reproducible_and_top_p_limits_choices() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = [
        [sample_rows(logits, [row(1.0, 0.7, 3, i)]).token_ids[0] for i in range(50)]
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
    # top_p=0.7 keeps tokens 0 and 1 only (0.5 < 0.7 <= 0.8).
    assert set(draws[0]) <= {0, 1} and len(set(draws[0])) == 2


def test_the_draw_depends_on_the_seed_and_position_not_on_the_batch() -> None:
    logits = torch.zeros(1, 50)
    alone = [sample_rows(logits, [row(1.0, 1.0, 9, i)]).token_ids[0] for i in range(20)]
    batched = sample_rows(logits.expand(20, -1), [row(1.0, 1.0, 9, i) for i in range(20)])
    assert batched.token_ids == alone
    assert len(set(alone)) > 5  # positions draw differently


def test_high_temperature_spreads_choices() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    seen = {sample_rows(logits, [row(5.0, 1.0, 1, i)]).token_ids[0] for i in range(200)}
    assert seen == {0, 1, 2, 3}


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    sampled = sample_rows(logits, [row(1e-40, 1.0, 5, 0)])
    assert sampled.token_ids == [1] and sampled.errors == [None]


def test_a_row_with_non_finite_logits_fails_alone() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [math.nan, 0.0, 0.0], [2.0, 0.0, 0.0]])
    sampled = sample_rows(logits, [row(), row(1.0), row()])
    assert sampled.token_ids[0] == 1 and sampled.token_ids[2] == 0
    assert sampled.errors[0] is None and sampled.errors[2] is None
    assert "non-finite" in (sampled.errors[1] or "")


def test_rows_cross_the_data_plane_as_tensors() -> None:
    rows = [row(0.7, 0.9, 2**62, 3), row()]
    assert rows_from_tensors(sampling_tensors(rows)) == rows
