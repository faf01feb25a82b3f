"""Grids, request checks, a decoder-only run, and whole-forward validation (reduced sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exegpt.models.kv_cache import KVCacheSpec
from exegpt.models.loader import load_model
from exegpt.models.prepack import PackedLinear, linear_kernel, packing_applies
from exegpt.profile.layer_profile import LayerProfile, load_profile
from services.profiler.measure import layers as measure_layers
from services.profiler.measure.forwards import WholeForwards, decode, prefill
from services.profiler.measure.grid import FULL, QUICK, ProfileGrid, build_grid
from services.profiler.measure.layers import spread_evenly
from services.profiler.measure.run import ProfileRequest, check_request, prepare_run, run_profile
from services.profiler.measure.timing import stats_of
from services.profiler.measure.validate import (
    ValidationPoint,
    common_shift,
    format_table,
    repeatability,
    summarize,
    validate_profile,
)
from tests.profiler.conftest import assert_sums_add_up_to_whole_forwards
from tests.tiny_profile import TINY_GRID, tiny_request


def test_presets_and_overrides() -> None:
    assert build_grid("quick", {}) == ("quick", QUICK)
    name, grid = build_grid("full", {"batch_sizes": [1, 8], "num_repeats": 3})
    assert name == "full-custom" and grid.batch_sizes == (1, 8) and grid.num_repeats == 3
    assert grid.seq_lens_tokens == FULL.seq_lens_tokens
    name, grid = build_grid(None, TINY_GRID.to_dict())
    assert name == "custom" and grid == TINY_GRID
    assert ProfileGrid.from_dict(QUICK.to_dict()) == QUICK


@pytest.mark.parametrize(
    ("base", "overrides", "message"),
    [
        ("huge", {}, "unknown grid 'huge'"),
        (None, {}, "batch_sizes is empty"),
        ("quick", {"batch_sizes": ()}, "batch_sizes is empty"),
        ("quick", {"seq_lens_tokens": (128, 16)}, "strictly increasing"),
        ("quick", {"kv_lens_tokens": (0, 16)}, "must be >= 1"),
        ("quick", {"num_tokens": (1, 1)}, "strictly increasing"),
        ("quick", {"message_bytes": (1,)}, "must be >= 4"),
        ("quick", {"num_repeats": 0}, "num_repeats >= 1"),
        ("quick", {"num_rounds": 0}, "num_rounds >= 1"),
        ("quick", {"batch_sizes": (1.5, 2)}, "must hold integers"),
        ("quick", {"colour": "blue"}, "unknown grid fields"),
    ],
)
def test_invalid_grids_are_named(base: str | None, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_grid(base, overrides)


def test_grid_points_respect_the_caps_and_the_context() -> None:
    grid = ProfileGrid(
        batch_sizes=(1, 64),
        seq_lens_tokens=(16, 1024),
        kv_lens_tokens=(1, 1024),
        num_tokens=(1,),
        message_bytes=(1024,),
        max_encode_tokens=4096,
        max_kv_tokens=4096,
    )
    # Every batch keeps its shortest length; the rest obey the token caps.
    assert grid.encode_points(num_heads=4) == [(1, 16), (1, 1024), (64, 16)]
    assert grid.decode_points() == [(1, 1), (1, 1024), (64, 1)]
    assert grid.for_context(512).seq_lens_tokens == (16,)
    with pytest.raises(ValueError, match="exceeds the model's context of 8 tokens"):
        grid.for_context(8)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
        ({"tp_degrees": (3,)}, "does not divide num_heads=4"),
        ({"tp_degrees": ()}, "no TP degrees"),
        ({"device": "tpu"}, "unknown device 'tpu'|unsupported device"),
        ({"dtype": "int8"}, "unsupported dtype 'int8'"),
        ({"grid_name": "nope", "grid": None}, "unknown grid 'nope'"),
    ],
)
def test_bad_requests_fail_before_measuring(request_fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_request(tiny_request(**request_fields))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it() -> None:
    with pytest.raises(ValueError, match="this machine has no CUDA"):
        check_request(tiny_request(device="cuda"))


def test_a_degree_needs_a_core_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.profiler.measure.run.os.cpu_count", lambda: 2)
    with pytest.raises(ValueError, match="TP degree 4 needs 4 ranks, but this machine has 2"):
        check_request(tiny_request(tp_degrees=(4,)))
    assert check_request(tiny_request(tp_degrees=None)).tp_degrees == (1, 2)


def test_tp_degrees_always_include_one() -> None:
    checked = check_request(tiny_request(tp_degrees=(2,)))
    assert checked.tp_degrees == (1, 2)
    assert checked.devices_used() == frozenset({"cpu"})


def test_a_decoder_only_model_profiles_prefill_and_decode(llama_dir: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    data = run_profile(
        ProfileRequest(model=str(llama_dir), grid_name="tiny", grid=TINY_GRID, tp_degrees=(1, 2)),
        on_progress=lambda event: progress.append((event.num_done, event.num_total)),
    )
    assert progress[-1][0] == progress[-1][1]
    assert data.model.family == "llama" and not data.model.is_encoder_decoder
    assert data.compute[2].decode_cross_attention is None
    profile = LayerProfile(data)
    for tp in (1, 2):
        assert profile.encode_attention_s(2, 32, tp) > 0  # the decoder layer's prefill
        # attention may carry a correction down to zero; a layer's time stays positive
        assert profile.decode_attention_s(2, 16, 0, tp) >= 0
        assert profile.decode_attention_s(2, 16, 0, tp) + profile.decode_rest_s(2, tp) > 0
        assert profile.decode_rest_s(2, tp) > 0
    assert profile.kv_bytes_per_token(2) == 2 * 1 * 16 * 4  # K and V, one of two KV heads
    assert_sums_add_up_to_whole_forwards(data)


def test_validation_compares_whole_forwards(t5_profile_path: Path) -> None:
    profile = load_profile(t5_profile_path)
    loaded = load_model("exegpt-tiny-t5")
    steps: list[tuple[int, int]] = []
    points = validate_profile(
        profile,
        loaded,
        num_threads=torch.get_num_threads(),
        points=(prefill(1, 16), prefill(2, 64), decode(2, 8, 8), decode(4, 8, 8)),
        num_warmup=1,
        num_repeats=3,
        num_rounds=2,
        on_step=lambda done, total: steps.append((done, total)),
    )
    assert steps[-1] == (8, 8)
    assert [p.point.kind for p in points] == ["prefill", "prefill", "decode", "decode"]
    assert all(p.predicted_s > 0 and p.measured_s > 0 for p in points)
    assert all(p.measured.num_repeats == 2 * 3 for p in points)  # both rounds' samples
    # (2, 64) and batch 4 lie past the tiny grid: flagged, not silently trusted.
    assert [p.extrapolated for p in points] == [False, True, False, True]
    median, worst = summarize(points)
    assert 0 <= median <= worst
    table = format_table(points)
    assert "(extrapolated)" in table and "inside the profile's grid" in table
    assert "the machine's own repeatability" in table  # two rounds: two halves
    assert all(len(p.rounds) == 2 and p.halves_differ() is not None for p in points)


def test_repeatability_compares_the_two_halves_of_the_rounds() -> None:
    def point(*round_medians: float) -> ValidationPoint:
        rounds = tuple(stats_of([m]) for m in round_medians)
        return ValidationPoint(prefill(1, 16), 1.0, False, rounds)

    steady, drifting = point(1.0, 1.1, 1.0, 1.1), point(1.0, 1.0, 1.3, 1.3)
    assert steady.halves_differ() == pytest.approx(0.0)
    assert drifting.halves_differ() == pytest.approx(0.3)
    assert point(1.0, 2.0, 1.5).halves_differ() == pytest.approx(0.75)  # 1.0 vs median(2, 1.5)
    assert repeatability([steady, drifting]) == pytest.approx((0.15, 0.3))
    assert point(1.0).halves_differ() is None and repeatability([point(1.0)]) is None
    assert "first and second half of the rounds differ by median 15.0%, worst 30.0%" in (
        format_table([steady, drifting])
    )


def test_a_common_shift_is_told_apart_from_the_shape_error() -> None:
    def point(predicted_s: float, measured_s: float) -> ValidationPoint:
        return ValidationPoint(prefill(1, 16), predicted_s, False, (stats_of([measured_s]),))

    # Everything ran 20% slower than profiled; one point is also 10% off on its own.
    points = [point(1.0, 1.25), point(2.0, 2.5), point(0.5, 0.625), point(1.1, 1.25)]
    shift, median, worst = common_shift(points)
    assert shift == pytest.approx(-0.2)
    assert median == pytest.approx(0.0) and worst == pytest.approx(0.1)
    assert "share a shift of -20.0%" in format_table(points)
    assert "around it: median 0.0%, worst 10.0%" in format_table(points)


def test_validation_skips_forwards_longer_than_the_context(llama_dir: Path) -> None:
    data = run_profile(tiny_request(model=str(llama_dir)))
    points = validate_profile(
        LayerProfile(data),
        load_model(str(llama_dir)),
        num_threads=1,
        points=(prefill(1, 16), prefill(1, 300), decode(1, 8, 255), decode(1, 8, 256)),
        num_repeats=3,
        num_rounds=1,
    )
    # the tiny Llama's context is 256 tokens: a 300-token prompt and a step to 257 do not fit
    assert [p.point for p in points] == [prefill(1, 16), decode(1, 8, 255)]


def test_whole_forwards_stay_within_the_kv_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Points whose K/V would pass the budget get no whole forward; their overhead is
    extrapolated from the points that had one, and flagged."""
    loaded = load_model("exegpt-tiny-t5")
    block_bytes = 4 * 2048 * 16  # K and V of 16 tokens in each of the 4 decoder layers
    assert KVCacheSpec.for_model(loaded.config).bytes_per_token() * 16 == block_bytes
    forwards = WholeForwards(
        loaded, [prefill(1, 16), decode(4, 16, 64)], max_kv_bytes=5 * block_bytes
    )
    assert forwards.covers(prefill(1, 16)) and forwards.pool.num_blocks == 2
    assert not forwards.covers(decode(4, 16, 64))  # 4 x (5 self + 1 cross) blocks

    # The tiny grid's largest steps (batch 2 at the longest lengths) need 6 blocks.
    monkeypatch.setattr(measure_layers, "MAX_KV_STORE_BYTES", 5 * block_bytes)
    data = run_profile(tiny_request())
    rows = {row.batch_size: row.sizes for row in data.decode_whole.rows}
    assert rows == {1: [1, 16], 2: [1]}
    assert {row.batch_size: row.sizes for row in data.prefill_whole.rows} == {1: [8, 32], 2: [8]}
    profile = LayerProfile(data)
    assert not profile.is_extrapolated("decode_attention_s", 2, 1, 1, 1)
    assert profile.is_extrapolated("decode_attention_s", 2, 16, 16, 1)
    assert profile.decode_attention_s(2, 16, 16, 1) + profile.decode_rest_s(2, 1) > 0


def test_a_round_spreads_every_kind_of_measurement_over_its_length() -> None:
    merged = spread_evenly([list("abcdef"), [1, 2], ["x"]])
    assert merged == ["a", "b", 1, "c", "x", "d", "e", 2, "f"]
    assert spread_evenly([[], [1]]) == [1]


def test_a_bf16_profile_times_the_linears_serving_runs() -> None:
    """Every Linear the profiler times (the whole model and each TP degree's shards) is the
    module a serving worker runs in bfloat16 here: packed for oneDNN where that applies."""
    run = prepare_run(tiny_request(tp_degrees=(1, 2), dtype="bfloat16"))
    profiler = measure_layers.LayerProfiler(run.loaded, run.grid, run.tp_degrees, 2)
    modules = [*run.loaded.model.modules()]
    for shards in profiler.shards.values():
        for layer in (*shards.encode_layers, *shards.decode_layers):
            modules += [*layer.modules()]
    kinds = {type(m) for m in modules if isinstance(m, (torch.nn.Linear, PackedLinear))}
    served = PackedLinear if packing_applies(torch.bfloat16, "cpu") else torch.nn.Linear
    assert kinds == {served}
    assert profiler.linear_kernel == linear_kernel(torch.bfloat16, "cpu")
