"""The "after calibration" protocol of `exegpt demo` and the benchmarks: a short pass on the
real serving path, fed to the calibration by kind, then a plan (or a prediction) from the
calibrated profile.

Before its measured burst, a deployment serves a short saturating burst of the same workload
(router, gRPC, HTTP and the bench client all running, as in the measurement). The engine's
clock over that burst (GetStats `step_totals`: steps, rows, compute, forward and host seconds
by step kind; services/worker/engine_clock.py) becomes one observation per kind of cost, each
compared with what the uncalibrated profile predicts for the same steps:

- ENCODE: a prefill step's compute (`KindTotals.work_s`) at the mean rows admitted per step
  (linear between the whole batch sizes around it, as the simulator prices a fractional
  batch) and the workload's prompts, less what the simulator prices beside the encoder
  layers (the embeddings, the LM head and an encoder-decoder's first decoder step, that one
  at the pass's decode factor: `prefill_parts` in services/scheduler/simulator/common.py);
- DECODE: a decode step's compute at the mean rows per step and the workload's expected KV
  lengths, less the embedding and the LM head;
- OVERHEAD: the host seconds of all steps against the serving-overhead terms over the same
  steps, rows and admitted requests (linear in them, so the totals compare exactly).

The ratios go through `Calibration.updated` (services/scheduler/calibration.py), the result is
stored beside a copy of the profile (calibration_store.py) and the prediction is made from
that copy, as every later plan on it would be (`exegpt plan` and the scheduler read the
calibration stored beside a profile the same way). `replan` then plans again from the copy:
the schedule chosen on the uncalibrated profile is only a first guess. Kinds without steps,
or without a term in the profile, keep their factor of 1.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from exegpt.cost_model import at_rows
from exegpt.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:  # the scheduler's library is imported where it is used, as autoplan.py does
    from exegpt.commands.autoplan import AutoPlan, PlanRequest
    from exegpt.launcher import Deployment
    from services.scheduler.calibration import Calibration
    from services.scheduler.observations import StageKind
    from services.scheduler.simulator.common import LayerCosts


@dataclass(frozen=True)
class KindTotals:
    """One step kind's engine-clock totals over the calibration pass."""

    num_steps: int
    num_rows: int
    forward_s: float
    host_s: float
    # The executor's compute, uncapped (GetStats compute_s): 0 from a worker without it.
    compute_s: float = 0.0

    @property
    def work_s(self) -> float:
        """The steps' compute to price: `compute_s`, else `forward_s`. forward_s is capped at
        each step's share of the engine's wall time, so on a deployment whose steps overlap
        (a WAA encode on its own device beside decode steps) it cuts them short: it read a
        WAA-C encode factor of x0.24 where single-device deployments read x1.4-1.6."""
        return self.compute_s if self.compute_s > 0 else self.forward_s


def engine_totals(address: str) -> dict:
    """A worker's engine clock by step kind (GetStats step_totals)."""
    with grpc.insecure_channel(address) as channel:
        stats = worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest())
    return {t.kind: t for t in stats.step_totals}


def calibration_burst(
    deployment: Deployment,
    workload: str,
    num_requests: int,
    work: Path,
    length_scale: float | None,
    warmup_requests: int | None = None,
    seed: int = 0,
) -> dict[str, KindTotals]:
    """A warm-up burst (first forwards, pools filling: unused; `warmup_requests`, by default
    a quarter of the calibration's and at least 16), then a calibration burst of
    `num_requests` (sized by exegpt/bench/burst.py `calibration_pass_size`; both bursts'
    lengths drawn with `seed`) whose engine-clock totals, summed over the replicas, come
    back."""
    from exegpt.bench.against_plan import run_bench

    url = deployment.http_url
    warmup = warmup_requests or max(16, num_requests // 4)
    run_bench(url, workload, warmup, work / "warmup.json", length_scale, seed)
    before = [engine_totals(a) for a in deployment.worker_addresses]
    run_bench(url, workload, num_requests, work / "calibration.json", length_scale, seed)
    after = [engine_totals(a) for a in deployment.worker_addresses]
    return sum_totals([totals_between(b, a) for b, a in zip(before, after, strict=True)])


def totals_between(before: dict, after: dict) -> dict[str, KindTotals]:
    """Per step kind, `after` minus `before` (GetStats step_totals keyed by kind)."""
    none = KindTotals(0, 0, 0.0, 0.0)
    delta = {}
    for kind, end in after.items():
        start = before.get(kind) or none
        delta[kind] = KindTotals(
            int(end.num_steps - start.num_steps),
            int(end.num_rows - start.num_rows),
            end.forward_s - start.forward_s,
            end.host_s - start.host_s,
            end.compute_s - start.compute_s,
        )
    return delta


def sum_totals(parts: list[dict[str, KindTotals]]) -> dict[str, KindTotals]:
    """Per step kind, the totals of several replicas added up."""
    summed: dict[str, KindTotals] = {}
    for part in parts:
        for kind, t in part.items():
            s = summed.get(kind, KindTotals(0, 0, 0.0, 0.0))
            summed[kind] = KindTotals(
                s.num_steps + t.num_steps,
                s.num_rows + t.num_rows,
                s.forward_s + t.forward_s,
                s.host_s + t.host_s,
                s.compute_s + t.compute_s,
            )
    return summed


def calibration_from_totals(
    profile: str, workload: str, length_scale: float | None, totals: dict[str, KindTotals]
) -> Calibration:
    """The uncalibrated profile corrected, kind by kind, by what the pass measured."""
    from services.scheduler.calibration import Calibration
    from services.scheduler.observations import StageKind
    from services.scheduler.problem_builder import load_cost_model
    from services.scheduler.simulate import workload_of
    from services.scheduler.simulator.common import LayerCosts, WorkloadStats, prefill_parts

    cost_model = load_cost_model(profile).model
    stats = WorkloadStats.from_workload(
        workload_of(workload, length_scale, cost_model.shape.max_context_tokens)
    )
    costs = LayerCosts(cost_model, stats)
    shape = cost_model.shape
    ratios: dict[StageKind, float] = {}
    counts: dict[StageKind, int] = {}
    prefill, decode = totals.get("prefill"), totals.get("decode")
    if decode is not None and decode.num_steps > 0:
        rows = decode.num_rows / decode.num_steps
        layers_s = decode.work_s / decode.num_steps
        layers_s -= at_rows(rows, lambda r: costs.embedding_s(r) + costs.lm_head_s(r))
        predicted_s = at_rows(rows, lambda r: shape.num_decode_layers * sum(costs.decode(r, 1)))
        _keep(ratios, counts, StageKind.DECODE, layers_s, predicted_s, decode.num_steps)
    if prefill is not None and prefill.num_steps > 0:
        # The encoder layers: the forward less what the simulator prices beside them (the
        # embeddings, the LM head and an encoder-decoder's first decoder step, that one at
        # the decode factor the same pass read, as the calibrated simulator prices it).
        rows = prefill.num_rows / prefill.num_steps
        decode_factor = ratios.get(StageKind.DECODE, 1.0)
        layers_s = prefill.work_s / prefill.num_steps
        layers_s -= at_rows(rows, lambda r: _beside_encoder_s(costs, r, decode_factor))
        predicted_s = at_rows(rows, lambda r: prefill_parts(costs, r).encoder_s)
        _keep(ratios, counts, StageKind.ENCODE, layers_s, predicted_s, prefill.num_steps)
    host_s = predicted_host_s = 0.0
    num_steps = 0
    overhead = costs.overhead
    for kind, per_step in (
        ("prefill", overhead.prefill_step_s),
        ("decode", overhead.decode_step_s),
    ):
        part = totals.get(kind)
        if part is None or part.num_steps == 0:
            continue
        predicted_host_s += part.num_steps * per_step(part.num_rows / part.num_steps)
        host_s += part.host_s
        num_steps += part.num_steps
    _keep(ratios, counts, StageKind.OVERHEAD, host_s, predicted_host_s, num_steps)
    return Calibration().updated(ratios, counts)


def _beside_encoder_s(costs: LayerCosts, rows: int, decode_factor: float) -> float:
    """What the calibrated simulator prices in a prefill of `rows` beside its encoder layers."""
    from services.scheduler.simulator.common import prefill_parts

    parts = prefill_parts(costs, rows)
    return parts.outside_s + decode_factor * parts.first_step_s


def _keep(
    ratios: dict[StageKind, float],
    counts: dict[StageKind, int],
    kind: StageKind,
    measured_s: float,
    predicted_s: float,
    count: int,
) -> None:
    if measured_s > 0 and predicted_s > 0 and count > 0:
        ratios[kind] = measured_s / predicted_s
        counts[kind] = count


def calibrated_copy(profile: str, calibration: Calibration, directory: Path, name: str) -> str:
    """A copy of `profile` in `directory` with `calibration` stored beside it."""
    from services.scheduler.calibration_store import calibration_path, save_calibration

    copy = directory / f"{name}.json"
    shutil.copyfile(profile, copy)
    path = calibration_path(str(copy))
    assert path is not None
    if not save_calibration(path, calibration):
        raise OSError(f"could not store the calibration at {path}")
    return str(copy)


def replan(request: PlanRequest, calibrated: Path, bound_s: float, out_dir: Path) -> AutoPlan:
    """The plan for `request` at `bound_s`, made again from `calibrated`: a copy of the profile
    with its calibration stored beside it (`calibrated_copy`), which the one problem builder
    reads as `exegpt plan` does. ValueError when no schedule meets the bound there."""
    from exegpt.commands import autoplan

    request = replace(request, latency_bound=repr(bound_s), profile=calibrated)
    return autoplan.make_plan(request, calibrated, out_dir)


def predicted_on(profile: Path, auto: AutoPlan, request: PlanRequest) -> dict:
    """What `profile` (with any calibration beside it) predicts for `auto`'s schedule, as
    `exegpt simulate --plan` does: the first choice judged by what calibration knows."""
    from services.scheduler.simulate import PredictRequest, predict

    query = PredictRequest(
        profile=str(profile),
        workload=request.workload,
        num_devices=request.num_devices,
        plan=str(auto.path),
        length_scale=request.length_scale,
    )
    return predict(query)["predicted"]


@dataclass(frozen=True)
class DeployedPrediction:
    """What a plan predicts once calibrated on its own deployment's pass."""

    predicted: dict  # the plan's prediction on the profile so calibrated
    calibration: Calibration  # the earlier calibration, with every kind the pass saw replaced


def deployed_prediction(
    auto: AutoPlan,
    request: PlanRequest,
    profile: Path,
    earlier: Calibration,
    totals: dict[str, KindTotals],
    directory: Path,
    name: str,
) -> DeployedPrediction:
    """Calibrate a copy of the uncalibrated `profile` by a pass on `auto`'s own deployment
    (`totals`: its steps, at its rows, on the machine as loaded now) and predict `auto` there.
    Kinds the pass did not see keep `earlier`'s factor. The schedule is not chosen again: the
    pass only corrects what each step costs for the schedule already deployed."""
    fresh = calibration_from_totals(str(profile), request.workload, request.length_scale, totals)
    calibration = earlier.replaced_by(fresh)
    copy = Path(calibrated_copy(str(profile), calibration, directory, name))
    return DeployedPrediction(predicted_on(copy, auto, request), calibration)


@dataclass(frozen=True)
class Recalibrated:
    """A plan made again after a calibration pass."""

    plan: AutoPlan  # the re-plan; the first plan (judged calibrated) when none meets the bound
    calibration: Calibration
    first_calibrated: dict  # what the calibrated profile predicts for the first plan
    refused: str | None  # why no schedule meets the bound calibrated (None: re-planned)


def recalibrate(
    first: AutoPlan,
    request: PlanRequest,
    profile: Path,
    totals: dict[str, KindTotals],
    directory: Path,
    name: str,
    earlier: Calibration | None = None,
) -> Recalibrated:
    """Calibrate a copy of `profile` (named `name` in `directory`) by `totals`, judge the
    first plan on it, and plan again there at the first plan's bound. Kinds the pass did not
    see keep `earlier`'s factor, as in `deployed_prediction`."""
    calibration = calibration_from_totals(
        str(profile), request.workload, request.length_scale, totals
    )
    if earlier is not None:
        calibration = earlier.replaced_by(calibration)
    copy = Path(calibrated_copy(str(profile), calibration, directory, name))
    then = predicted_on(copy, first, request)
    try:
        plan = replan(request, copy, first.bound_s, directory)
        return Recalibrated(plan, calibration, then, None)
    except ValueError as exc:
        judged = replace(first, report={**first.report, "predicted": then})
        return Recalibrated(judged, calibration, then, str(exc))
