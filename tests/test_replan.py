"""The plan made again after calibration (exegpt/commands/calibration_pass.py `replan`): on the tiny
profile with hand-made timings (tests/steady_profile.py: a really measured one's automatic
bound moves with the machine's load, and once fell so far out that the first choice met it
even at 4x), a hand-made calibration saying decode steps take 4x the profile makes the re-plan
at the same bound pick a smaller decode batch that meets the bound on the calibrated profile,
where the first choice no longer does. A pass on the deployed plan's own
deployment (`deployed_prediction`) recalibrates its prediction without choosing again (on the
same profile: a measured one's encode costs once came out as nothing under load, so the pass
had no encode prediction to compare with)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exegpt.commands import autoplan
from exegpt.commands.calibration_pass import (
    KindTotals,
    calibrated_copy,
    deployed_prediction,
    replan,
)
from services.scheduler.calibration import Calibration
from services.scheduler.calibration_store import calibration_path, load_calibration
from services.scheduler.observations import StageKind
from services.scheduler.problem_builder import load_cost_model
from services.scheduler.simulate import PredictRequest, predict, workload_of
from services.scheduler.simulator.common import LayerCosts, WorkloadStats, prefill_parts


def _request(profile: Path, bound: str) -> autoplan.PlanRequest:
    return autoplan.PlanRequest(
        workload="task:S",
        latency_bound=bound,
        num_devices=2,
        length_scale=0.25,
        profile=profile,
    )


def test_a_slower_decode_makes_the_replan_choose_a_smaller_schedule(
    steady_tiny_profile: Path, tmp_path: Path
) -> None:
    first = autoplan.make_plan(
        _request(steady_tiny_profile, "auto:0.5"), steady_tiny_profile, tmp_path
    )
    slow_decode = Calibration().updated({StageKind.DECODE: 4.0}, {StageKind.DECODE: 100})
    copy = Path(calibrated_copy(str(steady_tiny_profile), slow_decode, tmp_path, "cal"))
    # The calibration sits beside the copy, where every plan on the copy reads it.
    assert load_calibration(calibration_path(str(copy))) == slow_decode

    again = replan(_request(steady_tiny_profile, "inf"), copy, first.bound_s, tmp_path)

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
    # that runs fewer sequences at once (over all its replicas).
    assert first_then["latency_s"] > first.bound_s
    assert again.report["schedule"] != first.report["schedule"]

    def running(plan: autoplan.AutoPlan) -> int:
        return plan.plan.schedule.decode_batch_size * plan.plan.schedule.num_replicas

    assert running(again) < running(first)


def test_the_deployed_plan_is_predicted_on_its_own_pass_without_being_chosen_again(
    steady_tiny_profile: Path, tmp_path: Path
) -> None:
    request = _request(steady_tiny_profile, "auto:0.5")
    auto = autoplan.make_plan(request, steady_tiny_profile, tmp_path)
    model = load_cost_model(str(steady_tiny_profile)).model
    workload = workload_of("task:S", 0.25, model.shape.max_context_tokens)
    costs = LayerCosts(model, WorkloadStats.from_workload(workload))
    shape = model.shape
    # The deployment's own pass: prefills of 6 requests whose layers took 3x the profile,
    # decode steps of 20 rows at 2x; the embedding and LM head as priced; no host time seen.
    parts = prefill_parts(costs, 6)  # the decoder's first step at the decode factor
    prefill_s = parts.outside_s + 3.0 * parts.encoder_s + 2.0 * parts.first_step_s
    decode_s = costs.embedding_s(20) + costs.lm_head_s(20)
    decode_s += 2.0 * shape.num_decode_layers * sum(costs.decode(20, 1))
    totals = {
        "prefill": KindTotals(4, 24, 4 * prefill_s, 0.0),
        "decode": KindTotals(30, 600, 30 * decode_s, 0.0),
    }
    earlier = Calibration(
        {StageKind.ENCODE: 9.0, StageKind.OVERHEAD: 0.5},
        {StageKind.ENCODE: 5, StageKind.OVERHEAD: 7},
    )

    own = deployed_prediction(auto, request, steady_tiny_profile, earlier, totals, tmp_path, "own")

    # Encode and decode come from the pass (against the uncalibrated profile); the overhead,
    # which the pass did not see, keeps the earlier factor.
    assert own.calibration.factor(StageKind.ENCODE) == pytest.approx(3.0)
    assert own.calibration.factor(StageKind.DECODE) == pytest.approx(2.0)
    assert own.calibration.factor(StageKind.OVERHEAD) == 0.5
    # The same schedule, predicted as a copy calibrated by hand with those factors predicts it.
    by_hand = Calibration({StageKind.ENCODE: 3.0, StageKind.DECODE: 2.0, StageKind.OVERHEAD: 0.5})
    copy = calibrated_copy(str(steady_tiny_profile), by_hand, tmp_path, "by-hand")
    expected = predict(
        PredictRequest(profile=copy, workload="task:S", num_devices=2, plan=str(auto.path),
                       length_scale=0.25)
    )["predicted"]  # fmt: skip
    assert own.predicted["describe"] == auto.predicted["describe"]
    assert own.predicted["throughput_seq_s"] == pytest.approx(expected["throughput_seq_s"])
    assert own.predicted["latency_s"] == pytest.approx(expected["latency_s"])
    # Steps two and three times slower than the profile: fewer sequences per second.
    assert own.predicted["throughput_seq_s"] < auto.predicted["throughput_seq_s"] / 1.5
