"""Monotone interpolation of measured costs, flagged extrapolation, and the profile's queries."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from exegpt.profile.format import ProfileData
from exegpt.profile.interpolate import Curve, Surface, isotonic, pchip_slopes
from exegpt.profile.layer_profile import LayerProfile, load_profile
from tests.profiler.conftest import (
    assert_sums_add_up_to_whole_forwards,
    with_whole_forwards_at,
)


def test_isotonic_pools_adjacent_violators() -> None:
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([5.0, 4.0, 3.0]) == [4.0, 4.0, 4.0]
    assert isotonic([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]


def test_noisy_measurements_become_a_non_decreasing_curve() -> None:
    curve = Curve.fit([1, 2, 4, 8, 16, 32], [1.0, 0.8, 1.5, 1.4, 3.0, 2.9])
    sizes = [1 + i * 0.37 for i in range(90)]
    values = [curve(size)[0] for size in sizes]
    assert all(b >= a - 1e-15 for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    "cost",
    [
        lambda n: 2e-3 * n**2,  # attention over a sequence
        lambda n: 5e-4 * n**1.5,
        lambda n: 3e-6 * n,
    ],
)
def test_power_laws_are_interpolated_exactly(cost: object) -> None:
    sizes = [1, 8, 64, 512]
    curve = Curve.fit(sizes, [cost(s) for s in sizes])  # type: ignore[operator]
    for size in (2, 5, 20, 100, 300, 500):
        value, extrapolated = curve(size)
        assert not extrapolated
        assert value == pytest.approx(cost(size), rel=1e-9)  # type: ignore[operator]


@pytest.mark.parametrize(
    "cost",
    [lambda n: 300 + n, lambda n: 1000 + 0.01 * n * n, lambda n: 50 + n + 1e-3 * n * n],
)
def test_bent_costs_between_far_apart_points_stay_close(cost: object) -> None:
    """A fixed cost giving way to a linear or quadratic one, sizes a factor 8 apart: a
    straight log-log chord is 13-30% high here; the monotone cubic within 10%."""
    sizes = [16, 128, 1024]
    curve = Curve.fit(sizes, [cost(s) for s in sizes])  # type: ignore[operator]
    for size in (20, 50, 100, 200, 300, 500, 800):
        assert curve(size)[0] == pytest.approx(cost(size), rel=0.1)  # type: ignore[operator]


def test_pchip_slopes_never_overshoot_flat_steps() -> None:
    # A plateau between two rises: the interpolant must stay flat on it.
    x = [math.log(s) for s in (1, 2, 4, 8)]
    y = [math.log(v) for v in (1.0, 2.0, 2.0, 4.0)]
    slopes = pchip_slopes(x, y)
    assert slopes[1] == 0.0 and slopes[2] == 0.0
    curve = Curve.fit([1, 2, 4, 8], [1.0, 2.0, 2.0, 4.0])
    assert curve(3)[0] == pytest.approx(2.0)


def test_extrapolation_is_flagged_and_linear_above_the_grid() -> None:
    curve = Curve.fit([1, 10, 100], [1.0, 2.0, 11.0])
    value, extrapolated = curve(300)
    assert extrapolated
    assert value == pytest.approx(11.0 + (11.0 - 2.0) / 90 * 200)
    assert curve(100) == (11.0, False)
    # Below the smallest size the smallest value holds, and that is not extrapolation.
    assert curve(0.5) == (1.0, False)


def test_a_single_point_extrapolates_in_proportion() -> None:
    curve = Curve.fit([4], [2.0])
    assert curve(4) == (2.0, False)
    assert curve(8) == (4.0, True)


def test_zero_costs_interpolate_linearly() -> None:
    curve = Curve.fit([1, 3], [0.0, 2.0])
    assert curve(2)[0] == pytest.approx(1.0)


def test_remainders_are_kept_as_measured_and_interpolated_linearly() -> None:
    # A remainder falling with the size stays falling: pooling would lift the small sizes.
    curve = Curve.fit([1, 16, 128], [3.0, 2.0, -1.0], monotone=False)
    assert curve.values == (3.0, 2.0, -1.0)  # as measured, sign and all
    assert curve(1) == (3.0, False) and curve(16) == (2.0, False)
    assert curve(72)[0] == pytest.approx(0.5)  # halfway from 16 to 128
    assert curve(256) == (-1.0, True)  # past the grid: never below the last point
    surface = Surface.fit([(1, [1, 16], [3.0, 2.0]), (4, [1, 16], [1.0, 0.5])], monotone=False)
    assert surface(1, 16) == (2.0, False)
    assert surface(2.5, 16)[0] == pytest.approx(1.25)  # falling across batch sizes too


def test_curve_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Curve.fit([2, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many values"):
        Curve.fit([1, 2], [1.0])


def test_surface_uses_only_rows_that_reach_the_length() -> None:
    # Large batches skip long lengths; a query at a long length uses the rows that have it.
    surface = Surface.fit(
        [
            (1, [16, 128, 1024], [1.0, 8.0, 64.0]),
            (4, [16, 128, 1024], [4.0, 32.0, 256.0]),
            (16, [16, 128], [16.0, 128.0]),
        ]
    )
    assert surface(4, 1024) == (256.0, False)
    value, extrapolated = surface(16, 1024)  # the batch-16 row stops at 128
    assert extrapolated and value > 256.0
    assert surface(2, 128) == (pytest.approx(16.0), False)  # cost = batch * length / 16
    value, extrapolated = surface(8, 64)
    assert not extrapolated and value == pytest.approx(32.0, rel=1e-6)
    assert surface(32, 16)[1]  # past the largest batch


def test_profile_queries_are_monotone_and_flag_extrapolation(t5_profile: ProfileData) -> None:
    # Factors of noisy whole forwards over their parts may make a cost dip (layer_profile.py); with
    # one factor over the grid, every query rises.
    profile = LayerProfile(with_whole_forwards_at(t5_profile, lambda kind, batch, size: 1.3))
    for tp in (1, 2):
        encode = [profile.encode_attention_s(2, s, tp) for s in (1, 8, 12, 20, 32)]
        # (a factor of 1.3 is 1.3 up to rounding: equal costs may differ in the last bits)
        assert all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(encode)), encode
        rest = [profile.encode_rest_s(n, tp) for n in (1, 2, 4, 9, 32)]
        assert all(b >= a for a, b in itertools.pairwise(rest))
        decode = [profile.decode_attention_s(b, 8, 8, tp) for b in (1, 2)]
        assert decode[1] >= decode[0] > 0
    assert not profile.is_extrapolated("encode_attention_s", 2, 20, 1)
    assert profile.num_extrapolated_queries == 0
    assert profile.is_extrapolated("encode_attention_s", 2, 64, 1)
    assert profile.is_extrapolated("decode_rest_s", 64, 1)
    before = profile.num_extrapolated_queries
    beyond = profile.decode_rest_s(64, 1)
    assert profile.num_extrapolated_queries == before + 1
    assert beyond >= profile.decode_rest_s(32, 1)


def test_the_factors_make_the_sums_whole_forwards(t5_profile: ProfileData) -> None:
    assert_sums_add_up_to_whole_forwards(t5_profile)


def test_profile_communication_and_memory_queries(t5_profile_path: Path) -> None:
    profile = load_profile(t5_profile_path)
    assert profile.allreduce_s(4096, 1) == 0.0
    assert profile.allreduce_s(65536, 2) >= profile.allreduce_s(1024, 2) > 0
    assert profile.transfer_s(65536) >= profile.transfer_s(1024) > 0
    assert profile.transfer_s(0) == 0.0
    assert profile.tp_degrees == (1, 2)
    assert profile.kv_bytes_per_token(2) * 2 == profile.kv_bytes_per_token(1)
    with pytest.raises(ValueError, match="no measurements for TP degree 4"):
        profile.encode_rest_s(16, 4)
    with pytest.raises(ValueError, match="non-negative"):
        profile.embedding_s(-1)
