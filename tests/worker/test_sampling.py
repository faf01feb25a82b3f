import math

import pytest
import torch

from services.worker.sampling import (
    RowSampling,
    _argmax_rows,
    rows_from_tensors,
    sample_rows,
    sampling_tensors,
)


def row(temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, index: int = 0) -> RowSampling:
    return RowSampling(temperature, top_p, seed, index)


def test_greedy_takes_argmax_per_row() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample_rows(logits, [row(), row()]).token_ids == [1, 0]


def test_greedy_picks_the_first_of_equal_maxima_as_torch_does() -> None:
    # bfloat16 logits of a real vocabulary's width tie often: rounded to 8 bits of mantissa,
    # and non-contiguous rows (a slice of a wider tensor) too.
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(16, 2 * 32128, generator=generator).round().to(torch.bfloat16)
    logits = wide[:, ::2]
    assert not logits.is_contiguous()
    expected = logits.float().argmax(dim=-1).tolist()
    for r in range(16):  # a tie at the top in every row
        assert int((logits[r] == logits[r].max()).sum()) > 1
    assert sample_rows(logits, [row()] * 16).token_ids == expected
    # The argmax itself on strided float32 rows (sample_rows hands it a float32 copy), with
    # a NaN in one row: both libraries take a NaN over any number.
    strided = wide.float()[:, ::2]
    strided[3, 7] = float("nan")
    assert not strided.is_contiguous()
    assert _argmax_rows(strided) == strided.argmax(dim=-1).tolist()
    assert _argmax_rows(strided)[3] == 7


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


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("column", [0, 517, 999])
def test_one_non_finite_logit_anywhere_in_a_wide_row_fails_that_row(
    bad: float, column: int
) -> None:
    """The check reads each row's largest and smallest logits (vectorised reductions): one
    NaN or infinity at the start, inside or at the end of a 1000-wide row is caught."""
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, column] = bad
    sampled = sample_rows(logits, [row(), row(), row()])
    assert sampled.errors[0] is None and sampled.errors[2] is None
    assert "non-finite" in (sampled.errors[1] or "") and sampled.token_ids[1] == -1


def test_rows_cross_the_data_plane_as_tensors() -> None:
    rows = [row(0.7, 0.9, 2**62, 3), row()]
    assert rows_from_tensors(sampling_tensors(rows)) == rows


def test_penalties_subtract_counts_before_temperature_for_greedy_rows_too() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    # Token 0 generated twice: 3 - 2*0.5 (frequency) - 0.2 (presence) = 1.8 < 2.5.
    params = RowSampling(0.0, 1.0, 0, 3, presence_penalty=0.2, frequency_penalty=0.5,
                         generated=(0, 0, 2))  # fmt: skip
    assert sample_rows(logits, [row()]).token_ids == [0]
    assert sample_rows(logits, [params]).token_ids == [1]
    negative = RowSampling(0.0, 1.0, 0, 1, presence_penalty=-2.0, generated=(2,))
    assert sample_rows(logits, [negative]).token_ids == [0]  # 0 + 2 = 2 < 3


def test_logprobs_are_the_final_distributions_log_softmax_with_top_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    rows = [
        RowSampling(0.0, 1.0, 0, 0, num_logprobs=2),
        RowSampling(0.5, 1.0, 7, 0, frequency_penalty=1.0, num_logprobs=3, generated=(1,)),
    ]
    sampled = sample_rows(logits, rows)
    assert sampled.logprobs is not None
    greedy, hot = sampled.logprobs
    expected = torch.log_softmax(logits[0], -1)
    assert greedy is not None and greedy.token_id == 1
    assert math.isclose(greedy.logprob, float(expected[1]), rel_tol=1e-6)
    assert [t.token_id for t in greedy.top] == [1, 2]
    final = torch.log_softmax(torch.tensor([1.0, 2.0, 2.0, 0.0]) / 0.5, -1)
    assert hot is not None and len(hot.top) == 3
    assert math.isclose(hot.logprob, float(final[hot.token_id]), rel_tol=1e-6)
    assert math.isclose(hot.top[0].logprob, float(final.max()), rel_tol=1e-6)
    assert sample_rows(logits, [row(), row()]).logprobs == [None, None]


def test_rows_and_logprobs_travel_as_tensors_unchanged() -> None:
    from services.worker.sampling import logprob_tensors, logprobs_from_tensors

    rows = [
        RowSampling(0.7, 0.9, 5, 3, 0.5, -1.0, num_logprobs=4, generated=(4, 4, 1)),
        RowSampling(0.0, 1.0, 2, 0),
        RowSampling(0.0, 1.0, 2, 1, frequency_penalty=2.0, num_logprobs=0, generated=(9,)),
    ]
    assert rows_from_tensors(sampling_tensors(rows)) == rows
    logits = torch.randn(3, 12)
    sampled = sample_rows(logits, rows)
    named = logprob_tensors(sampled, rows)
    assert logprobs_from_tensors(named, sampled.token_ids, rows) == sampled.logprobs
