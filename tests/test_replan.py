"""The plan made again after calibration (exegpt/calibration_pass.py `replan`): on the really
measured tiny profile, a hand-made calibration saying decode steps take 4x the profile makes
the re-plan at the same bound pick a smaller decode batch that meets the bound on the
calibrated profile, where the first choice no longer does."""

from __future__ import annotations

from pathlib import Path

from exegpt import autoplan
from exegpt.calibration_pass import calibrated_copy, replan
from services.scheduler.calibration import Calibration
from services.scheduler.calibration_store import calibration_path, load_calibration
from services.scheduler.observations import StageKind
from services.scheduler.simulate import PredictRequest, predict


def _request(profile: Path, bound: str) -> autoplan.PlanRequest:
    return autoplan.PlanRequest(
        workload="task:S",
        latency_bound=bound,
        num_devices=2,
        length_scale=0.25,
        profile=profile,
    )


def test_a_slower_decode_makes_the_replan_choose_a_smaller_schedule(
    measured_tiny_profile: Path, tmp_path: Path
) -> None:
    first = autoplan.make_plan(
        _request(measured_tiny_profile, "auto:0.5"), measured_tiny_profile, tmp_path
    )
    slow_decode = Calibration().updated({StageKind.DECODE: 4.0}, {StageKind.DECODE: 100})
    copy = Path(calibrated_copy(str(measured_tiny_profile), slow_decode, tmp_path, "cal"))
    # The calibration sits beside the copy, where every plan on the copy reads it.
    assert load_calibration(calibration_path(str(copy))) == slow_decode

    again = replan(_request(measured_tiny_profile, "inf"), copy, first.bound_s, tmp_path)

    assert again.bound_s == first.bound_s
    assert again.report["profile"] == str(copy)
    assert again.predicted["latency_s"] <= first.bound_s
    first_then = predict(
        PredictRequest(
            profile=str(copy),
            workload="task:S",
            num_devices=2,
            plan=str(first.path),
            length_scale=0.25,
        )
    )["predicted"]
    # Calibrated, the first choice is slower than the bound; the re-plan is another schedule
    # that runs fewer sequences at once.
    assert first_then["latency_s"] > first.bound_s
    assert again.report["schedule"] != first.report["schedule"]
    assert again.plan.schedule.decode_batch_size < first.plan.schedule.decode_batch_size
