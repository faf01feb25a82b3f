"""Calibration by kind of cost, kept beside the profile and shown by `exegpt plan`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from exegpt.cost_model import CostModel
from exegpt.serving_overhead import ServingOverhead
from services.scheduler.analytic_cost import analytic_cost_model
from services.scheduler.calibration import (
    Calibration,
    ScaledCostModel,
    predict_stage_s,
    stage_ratio,
)
from services.scheduler.calibration_store import (
    calibration_path,
    load_calibration,
    save_calibration,
)
from services.scheduler.config import SchedulerConfig
from services.scheduler.observations import StageKind, StageTimeObservation, WorkloadObservations
from services.scheduler.service import ReplanReason, SchedulerCore
from tests.scheduler.test_drift import (
    THRESHOLDS,
    FakeClock,
    RecordingPlanner,
    next_version,
    stage_observations,
)

BASE = analytic_cost_model("a40:opt-13b")


class WithOverhead:
    """The analytic model plus serving-overhead terms (a hand-made profile)."""

    def __init__(self, base: CostModel, overhead: ServingOverhead) -> None:
        self.base = base
        self.serving_overhead = overhead

    def __getattr__(self, name: str) -> object:
        return getattr(self.base, name)


def observe(
    model: CostModel, kind: StageKind, factor: float, num: int
) -> list[StageTimeObservation]:
    """`num` observations of `kind` that took `factor` times what `model` predicts."""
    observations = []
    for i in range(num):
        batch = 4 + i % 8
        probe = StageTimeObservation(kind, batch, batch * 200, 10, 1.0)
        measured_s = factor * predict_stage_s(model, probe)
        observations.append(StageTimeObservation(kind, batch, batch * 200, 10, measured_s))
    return observations


def test_each_kind_is_predicted_and_scaled_on_its_own() -> None:
    model = WithOverhead(BASE, ServingOverhead(step_s=0.002, token_s=0.0001))
    calibration = Calibration(
        {
            StageKind.ENCODE: 1.0,
            StageKind.DECODE: 1.5,
            StageKind.TRANSFER: 2.0,
            StageKind.OVERHEAD: 3.0,
        }
    )
    scaled = ScaledCostModel(model, calibration=calibration)  # type: ignore[arg-type]
    for kind, factor in calibration.factors.items():
        probe = StageTimeObservation(kind, 8, 8 * 200, 10, 1.0)
        assert predict_stage_s(scaled, probe) == pytest.approx(
            factor * predict_stage_s(model, probe)
        )
    assert scaled.encode_rest_s(512, 1) == BASE.encode_rest_s(512, 1)
    assert scaled.decode_rest_s(8, 1) == pytest.approx(1.5 * BASE.decode_rest_s(8, 1))
    assert scaled.transfer_s(1 << 20) == pytest.approx(2.0 * BASE.transfer_s(1 << 20))
    overhead_terms = scaled.serving_overhead
    assert (overhead_terms.step_s, overhead_terms.token_s) == pytest.approx((0.006, 0.0003))
    assert scaled.allreduce_s(1 << 20, 2) == BASE.allreduce_s(1 << 20, 2)
    # a model without overhead terms has none to predict or scale
    overhead = StageTimeObservation(StageKind.OVERHEAD, 8, 1, 0, 0.01)
    assert predict_stage_s(ScaledCostModel(BASE, calibration=calibration), overhead) == 0.0


def test_an_encode_timed_with_the_decoder_s_first_step_is_predicted_with_it() -> None:
    from exegpt.cost_model import decode_layer_s, encode_layer_s

    model = analytic_cost_model("a40:t5-11b")
    alone = StageTimeObservation(StageKind.ENCODE, 4, 4 * 50, 24, 1.0)
    with_step = StageTimeObservation(StageKind.ENCODE, 4, 4 * 50, 24, 1.0, num_first_step_layers=24)
    encode = 24 * sum(encode_layer_s(model, 4, 50, 200, 1))
    first_step = 24 * sum(decode_layer_s(model, 4, 1, 50, 1))
    assert predict_stage_s(model, alone) == pytest.approx(encode)
    assert predict_stage_s(model, with_step) == pytest.approx(encode + first_step)
    # Its ratio is the encoder layers' alone: the step, priced by the model calibrated so far
    # (decode x2 here), comes off first. Encoder layers at 1.5x the model give 1.5.
    scaled = ScaledCostModel(model, calibration=Calibration({StageKind.DECODE: 2.0}))
    measured_s = 1.5 * encode + 2.0 * first_step
    timed = StageTimeObservation(
        StageKind.ENCODE, 4, 4 * 50, 24, measured_s, num_first_step_layers=24
    )
    assert stage_ratio(scaled, timed) == pytest.approx(1.5)
    assert stage_ratio(scaled, dataclasses.replace(timed, measured_s=first_step)) is None
    assert stage_ratio(model, dataclasses.replace(alone, measured_s=2 * encode)) == pytest.approx(2)
    with pytest.raises(ValueError, match="only an encode"):
        StageTimeObservation(StageKind.DECODE, 4, 200, 24, 1.0, num_first_step_layers=24)
    with pytest.raises(ValueError, match="num_first_step_layers"):
        StageTimeObservation(StageKind.ENCODE, 4, 200, 24, 1.0, num_first_step_layers=-1)


def test_calibration_round_trips_and_refuses_bad_files(tmp_path: Path) -> None:
    calibration = Calibration({StageKind.DECODE: 1.25}, {StageKind.DECODE: 40})
    path = tmp_path / "p.calibration.json"
    assert save_calibration(path, calibration)
    assert load_calibration(path) == calibration
    assert calibration.describe() == "calibrated from 40 observations (decode x1.25 from 40)"
    assert Calibration().describe() == "uncalibrated"
    for bad in ({"factors": {"decode": -1}}, {"factors": {"warp": 1.0}}, [1], {"x": {}}):
        path.write_text(json.dumps(bad))
        assert load_calibration(path) is None  # reported and ignored
    with pytest.raises(ValueError, match="positive"):
        Calibration.from_dict({"factors": {"decode": 0}})
    assert calibration_path("analytic:a40") is None
    assert calibration_path(str(tmp_path / "quick.json")) == tmp_path / "quick.calibration.json"


def test_a_later_pass_replaces_the_kinds_it_measured_and_keeps_the_others() -> None:
    earlier = Calibration(
        {StageKind.ENCODE: 4.0, StageKind.DECODE: 3.0, StageKind.OVERHEAD: 0.5},
        {StageKind.ENCODE: 10, StageKind.DECODE: 40, StageKind.OVERHEAD: 50},
    )
    # The later pass was made against the uncalibrated profile: its factors replace, they do
    # not multiply (decode 2.0, not 3.0 x 2.0); overhead, which it did not see, stays 0.5.
    later = Calibration({StageKind.DECODE: 2.0, StageKind.ENCODE: 1.5},
                        {StageKind.DECODE: 30, StageKind.ENCODE: 6})  # fmt: skip
    both = earlier.replaced_by(later)
    assert both.factors == {
        StageKind.ENCODE: 1.5, StageKind.DECODE: 2.0, StageKind.OVERHEAD: 0.5
    }  # fmt: skip
    assert both.counts == {StageKind.ENCODE: 6, StageKind.DECODE: 30, StageKind.OVERHEAD: 50}
    assert Calibration().replaced_by(later) == later
    assert earlier.replaced_by(Calibration()) == earlier


def test_a_decode_slowdown_corrects_decode_not_prefill_and_is_kept(tmp_path: Path) -> None:
    profile = tmp_path / "hand-made.json"
    profile.write_text("{}")  # the loader below stands in for reading it

    def make_core(clock: FakeClock, planner: RecordingPlanner) -> SchedulerCore:
        config = SchedulerConfig(
            profile=str(profile),
            workload="task:S",
            num_devices=4,
            drift=THRESHOLDS,
            stage_window_size=50,
            replan_min_interval_s=60.0,
        )
        return SchedulerCore(
            config, planner=planner, clock=clock, cost_model_loader=lambda spec: BASE
        )

    async def scenario() -> None:
        clock, planner = FakeClock(), RecordingPlanner()
        core = make_core(clock, planner)
        await core.start()
        clock.now_s += 61
        model = planner.problems[0].cost_model
        assert isinstance(model, ScaledCostModel) and not model.calibration.num_observations
        on_time = stage_observations(model, 1.0, 12, StageKind.ENCODE)
        slow = stage_observations(model, 1.8, 12, StageKind.DECODE)
        core.report(WorkloadObservations("r0", stage_times=tuple(on_time + slow)))
        assert await asyncio.wait_for(next_version(core, 1), 5) == 2
        assert core.current is not None
        assert core.current.reason == ReplanReason.STAGE_TIME_DRIFT
        replanned = planner.problems[-1].cost_model
        assert isinstance(replanned, ScaledCostModel)
        assert replanned.calibration.factor(StageKind.DECODE) == pytest.approx(1.8)
        assert replanned.calibration.factor(StageKind.ENCODE) == pytest.approx(1.0)
        assert replanned.decode_rest_s(8, 1) == pytest.approx(1.8 * BASE.decode_rest_s(8, 1))
        assert replanned.encode_rest_s(512, 1) == pytest.approx(BASE.encode_rest_s(512, 1))
        await core.close()

    asyncio.run(scenario())
    stored = load_calibration(tmp_path / "hand-made.calibration.json")
    assert stored is not None
    assert stored.factor(StageKind.DECODE) == pytest.approx(1.8)
    assert stored.counts == {StageKind.ENCODE: 12, StageKind.DECODE: 12}

    # the next scheduler starts from it
    async def restart() -> None:
        planner = RecordingPlanner()
        core = make_core(FakeClock(), planner)
        await core.start()
        model = planner.problems[0].cost_model
        assert isinstance(model, ScaledCostModel)
        assert model.calibration == stored
        await core.close()

    asyncio.run(restart())
