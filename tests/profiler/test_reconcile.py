"""Parts reconciled with whole forwards by a factor of either sign (reconcile.py)."""

from __future__ import annotations

import pytest

from services.profiler.profile import LayerProfile
from services.profiler.profile_format import ProfileData, RowData, SurfaceData
from services.profiler.reconcile import ForwardFactor, scaled_layer_s
from services.profiler.validate import predict_decode_step_s, predict_prefill_s
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


def test_a_fixed_part_is_taken_off_the_whole_first() -> None:
    wholes = _surface({1: [(8, 0.010)]})
    factor = ForwardFactor.fit(wholes, lambda batch, length: 0.004, lambda batch, length: 0.002)
    assert factor.grid_factors() == pytest.approx([2.0])


def test_parts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ForwardFactor.fit(_surface({1: [(8, 0.010)]}), lambda batch, length: 0.0)


def test_the_scaled_layer_sums_to_the_factor_times_the_parts() -> None:
    assert scaled_layer_s(0.8, 1.0, 2.0, 2.0) + 2.0 == pytest.approx(0.8 * 3.0)
    assert scaled_layer_s(1.5, 1.0, 2.0, 2.0) + 2.0 == pytest.approx(1.5 * 3.0)
    # the kernel is a small share: the forward's correction takes attention below zero
    assert scaled_layer_s(0.9, 0.1, 2.0, 2.0) == pytest.approx(0.9 * 2.1 - 2.0)
    assert scaled_layer_s(0.0, 1.0, 2.0, 1.5) == -1.5  # a layer never takes less than no time


def test_forwards_faster_and_slower_than_their_parts(t5_profile: ProfileData) -> None:
    def factor(kind: str, index: int) -> float:
        return 0.9 if index % 2 == 0 else 1.2

    data = with_whole_forwards_at(t5_profile, factor)
    profile = LayerProfile(data)
    for kind, fitted in (
        ("decode_whole", profile._decode_factor),
        ("prefill_whole", profile._encode_factor),
    ):
        wanted = [factor(kind, i) for i in range(len(fitted.grid_factors()))]
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
