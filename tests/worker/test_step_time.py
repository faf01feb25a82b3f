"""The engine's step clock (step_time.py) on synthetic steps: the fit of fixed and per-token
seconds, its robustness to slow outliers, and no prediction before the steps tell them apart."""

from __future__ import annotations

import pytest

from services.worker.step_time import MIN_STEPS, StepTimeModel


def _clock(fixed_s: float, per_token_s: float, sizes: list[int]) -> StepTimeModel:
    clock = StepTimeModel()
    for num_tokens in sizes:
        clock.observe(num_tokens, fixed_s + per_token_s * num_tokens)
    return clock


def test_the_fit_recovers_fixed_and_per_token_seconds() -> None:
    clock = _clock(0.5, 0.25, [1, 2, 4, 8, 16, 32, 64, 128] * 2)
    fixed_s, per_token_s = clock.fit() or (0.0, 0.0)
    assert fixed_s == pytest.approx(0.5)
    assert per_token_s == pytest.approx(0.25)
    assert clock.seconds(10) == pytest.approx(3.0)
    assert clock.tokens_within(3.0) == 10
    assert clock.tokens_within(0.25) == 0  # under the fixed part: no token fits


def test_a_few_slow_steps_do_not_move_the_fit() -> None:
    clock = _clock(0.5, 0.25, [4, 4, 4, 4, 4, 64, 64, 64, 64, 64])
    clock.observe(4, 50.0)  # other work held the core: 30x its class's time
    clock.observe(64, 90.0)
    fixed_s, per_token_s = clock.fit() or (0.0, 0.0)
    assert fixed_s == pytest.approx(0.5)
    assert per_token_s == pytest.approx(0.25)


def test_no_prediction_before_the_steps_tell_the_parts_apart() -> None:
    assert _clock(0.5, 0.25, [1, 64] * ((MIN_STEPS - 1) // 2)).fit() is None  # too few
    same_size = _clock(0.5, 0.25, [8, 9, 10, 11] * MIN_STEPS)  # no spread of sizes
    assert same_size.fit() is None
    assert same_size.tokens_within(10.0) is None
    assert same_size.seconds(8) is None


def test_no_prediction_from_a_slope_that_is_not_positive() -> None:
    clock = StepTimeModel()
    for num_tokens in [1, 2, 4, 8, 16, 32, 64, 128]:
        clock.observe(num_tokens, 10.0 - 0.01 * num_tokens)  # bigger steps faster: no model
    assert clock.fit() is None


def test_the_window_follows_a_machine_whose_speed_changes() -> None:
    clock = _clock(0.5, 0.25, [1, 4, 16, 64] * 40)
    for _ in range(40):  # the last 160 steps (more than the window) run twice as slow
        for num_tokens in [1, 4, 16, 64]:
            clock.observe(num_tokens, 2 * (0.5 + 0.25 * num_tokens))
    fixed_s, per_token_s = clock.fit() or (0.0, 0.0)
    assert fixed_s == pytest.approx(1.0)
    assert per_token_s == pytest.approx(0.5)
