"""Parts reconciled with whole forwards by a factor of either sign (reconcile.py)."""

from __future__ import annotations

import pytest

from exegpt.profile.format import ProfileData, RowData, SurfaceData
from exegpt.profile.layer_profile import LayerProfile
from exegpt.profile.reconcile import ForwardFactor, scaled_attention_s
from services.profiler.measure.validate import predict_decode_step_s, predict_prefill_s
from tests.profiler.conftest import with_whole_forwards_at


def _surface(rows: dict[int, list[tuple[int, float]]]) -> SurfaceData:
    return SurfaceData(
        rows=[
            RowData(
                batch_size=batch,
                sizes=[size for size, _ in points],
                median_s=[whole for _, whole in points],
                p10_s=[whole for _, whole in points],
                p90_s=[whole for _, whole in points],
            )
            for batch, points in rows.items()
        ]
    )


def test_parts_that_outweigh_the_whole_give_a_factor_below_one() -> None:
    # parts = 1 ms per sequence-token; the small forward ran slower than its parts, the
    # large ones faster.
    wholes = _surface({1: [(8, 0.010), (64, 0.048)], 4: [(8, 0.030), (64, 0.256)]})
    factor = ForwardFactor.fit(wholes, lambda batch, length: 1e-3 * batch * length)
    assert factor.grid_factors() == pytest.approx([1.25, 0.75, 0.9375, 1.0])
    assert factor(1, 64) == (pytest.approx(0.75), False)
    assert factor(1, 36)[0] == pytest.approx(1.0)  # halfway between 1.25 and 0.75
    assert factor(2.5, 8)[0] == pytest.approx((1.25 + 0.9375) / 2)
    # past the grid the factor is held at the edge, and flagged
    assert factor(1, 512) == (pytest.approx(0.75), True)
    assert factor(16, 64) == (pytest.approx(1.0), True)


def test_a_factor_is_never_extrapolated_where_rows_stop_short() -> None:
    # the batch-4 row stops at length 8: at length 64 only batch 1 has a factor
    wholes = _surface({1: [(8, 0.010), (64, 0.048)], 4: [(8, 0.030)]})
    factor = ForwardFactor.fit(wholes, lambda batch, length: 1e-3 * batch * length)
    assert factor(4, 64) == (pytest.approx(0.75), True)  # held, and flagged
    assert factor(4, 8) == (pytest.approx(0.9375), False)


def test_a_fixed_part_is_taken_off_the_whole_first() -> None:
    wholes = _surface({1: [(8, 0.010)]})
    factor = ForwardFactor.fit(wholes, lambda batch, length: 0.004, lambda batch, length: 0.002)
    assert factor.grid_factors() == pytest.approx([2.0])


def test_parts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ForwardFactor.fit(_surface({1: [(8, 0.010)]}), lambda batch, length: 0.0)


def test_the_scaled_layer_sums_to_the_factor_times_the_parts() -> None:
    # attention 1, rest 2 (scaled by its own factor), outside share 0.5
    for factor, rest_factor in ((0.8, 0.8), (1.5, 1.2), (0.9, 1.0)):
        attention = scaled_attention_s(factor, 1.0, rest_factor, 2.0, 0.5)
        assert attention + rest_factor * 2.0 + 0.5 == pytest.approx(factor * 3.5)
    # a factor below 1 with much work outside the layers: attention stays a time
    assert scaled_attention_s(0.2, 1.0, 0.1, 2.0, 0.5) == 0.0


def test_costs_known_by_one_size_take_the_smallest_factor_of_that_size() -> None:
    wholes = _surface({1: [(8, 0.010), (64, 0.048)], 4: [(2, 0.009), (8, 0.030)]})
    factor = ForwardFactor.fit(wholes, lambda batch, length: 1e-3 * batch * length)
    by_batch = factor.by_batch()
    assert by_batch(1) == pytest.approx(0.75)
    assert by_batch(4) == pytest.approx(0.9375)
    assert by_batch(2) == pytest.approx(0.75 + (0.9375 - 0.75) / 3)
    assert by_batch(64) == by_batch(4)  # held past the grid
    by_tokens = factor.by_tokens()  # 8 tokens twice (1 x 8, 4 x 2), 32, 64
    assert by_tokens(8) == pytest.approx(1.125)
    assert by_tokens(32) == pytest.approx(0.9375)
    assert by_tokens(1000) == pytest.approx(0.75)


def test_forwards_faster_and_slower_than_their_parts(t5_profile: ProfileData) -> None:
    # decode: one factor per batch size; prefill: one per token count (the tiny grid's
    # batch x length products are distinct), so the rest of a layer carries it all
    def factor(kind: str, batch: int, size: int) -> float:
        if kind == "decode_whole":
            return 0.8 if batch == 1 else 1.25
        return 0.9 if (batch + size // 8) % 2 == 0 else 1.2

    data = with_whole_forwards_at(t5_profile, factor)
    profile = LayerProfile(data)
    for kind, fitted in (
        ("decode_whole", profile._decode_factor),
        ("prefill_whole", profile._encode_factor),
    ):
        rows = getattr(data, kind).rows
        wanted = [factor(kind, row.batch_size, size) for row in rows for size in row.sizes]
        assert fitted.grid_factors() == pytest.approx(wanted)
        assert min(wanted) < 1 < max(wanted)  # errors of both signs
    for row in data.decode_whole.rows:
        for size, whole_s in zip(row.sizes, row.median_s, strict=True):
            predicted = predict_decode_step_s(profile, row.batch_size, size, size)
            assert predicted == pytest.approx(whole_s, rel=1e-9)
    for row in data.prefill_whole.rows:
        for size, whole_s in zip(row.sizes, row.median_s, strict=True):
            predicted = predict_prefill_s(profile, row.batch_size, size)
            assert predicted == pytest.approx(whole_s, rel=1e-9)
