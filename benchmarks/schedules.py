"""The planned schedule against both baselines, measured, on 2 devices (here: 2 processes x 1
thread), per task and latency bound, in one go.

For each task and each bound (the 30% and 70% quantiles of static batching's predicted
latencies over its batch sizes, as the paper derives bounds: docs/design.md section 4), the
schedule `exegpt up --plan` would choose (the best predicted of any kind and replica count,
baselines included; a plan of R data-parallel replicas runs as R workers), static batching
(its best batch and replica count within the bound, on the same 2 devices) and continuous
batching on 2 data-parallel replicas (its best running batch at R = 2 within the bound) each
run in their own deployment under `exegpt bench` at saturation. Per row: the kind chosen,
predicted vs measured seq/s and p99-length latency (error %), whether the bound was met, each
baseline's measured seq/s and whether it met the bound, and the measured ratios against each
baseline and against the best baseline that met the bound ("-" when none did; measured as in
exegpt/bench/against_plan.py). Each of the three measured bursts prints its failed requests
("fail"); over 1% failed marks that measurement INVALID ("!"): it meets no bound and no ratio
is taken with it.

Lengths are scaled (`--length-scale`, default 0.25) in the plan and in the benchmark alike so
a run stays tractable on a CPU.

After calibration (--calibrate, the default): a deployment of continuous batching on 2
data-parallel replicas (sized from the first, uncalibrated plan) serves a warm-up burst and a
calibration burst whose engine-clock totals calibrate a copy of the profile by kind
(exegpt/commands/calibration_pass.py). The schedule is then PLANNED again from the calibrated copy
at the same bound (the calibration stored beside it, as `exegpt plan` reads it) and that plan is
the one deployed, measured and judged: the uncalibrated choice is only a first guess. The
baselines are sized on the same calibrated copy, so all three are held to the bound alike
(benchmarks/schedule_baselines.py); when no continuous configuration meets the bound there,
the row says so and the continuous baseline keeps the first plan's sizing (FALLBACK). Each
row's footer lines print the first choice, its uncalibrated prediction and what the
calibrated profile predicts for it, so the effect of re-planning shows, and how the
continuous baseline was sized. The calibration comes from another schedule on purpose: a
kind's factor belongs to the model on this machine, not to a schedule. Transfers are not
calibrated this way (the replicas hand nothing off).

The plan and both baselines are chosen against bound x (1 - --latency-headroom), as
`exegpt up --plan` chooses (exegpt/headroom.py), and every one is judged against the bound
itself ("met").

    python benchmarks/schedules.py --tasks S --bounds 1          # one row, a few minutes
    python benchmarks/schedules.py                               # 5 tasks x 2 bounds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from schedule_baselines import (  # noqa: E402
    Baseline,
    DpSizing,
    baseline_plan,
    best_met,
    continuous_at_devices,
    dp_config,
    failed_cell,
    first_plan_pass,
    first_plan_sizing,
    planned_config,
    row_json,
    size_dp,
    valid,
)
from schedule_runs import (  # noqa: E402
    Burst,
    Calibrating,
    burst_size,
    calibrate_on,
    measure,
    measure_planned,
    running_batches,
    warmup_requests,
)

from exegpt.bench import against_plan  # noqa: E402
from exegpt.commands import autoplan  # noqa: E402
from exegpt.commands.calibration_pass import DeployedPrediction, recalibrate  # noqa: E402
from exegpt.headroom import add_headroom_argument, planned_against  # noqa: E402
from exegpt.schedule import ScheduleKind  # noqa: E402
from services.scheduler.calibration import Calibration  # noqa: E402

TASKS = ("S", "T", "G", "C1", "C2")
BOUND_QUANTILES = (0.3, 0.7)
NONE_MEETS = "none meets the bound calibrated"


@dataclass(frozen=True)
class FirstChoice:
    """The plan chosen on the uncalibrated profile, before the calibration pass."""

    predicted: dict  # its uncalibrated prediction (its "describe" names the schedule)
    calibrated: dict | None  # what the calibrated profile predicts for it (None: no pass)
    replanned: str  # what the re-plan did: "kept", "changed", or why it failed

    @property
    def refused(self) -> bool:
        """Whether no schedule met the bound on the calibrated profile."""
        return self.replanned.startswith(NONE_MEETS)


@dataclass(frozen=True)
class Row:
    task: str
    bound_s: float
    kind: str
    describe: str
    planned: against_plan.Comparison  # the deployed plan: calibrated when calibrating
    first: FirstChoice
    calibration: str
    static: Baseline
    continuous_dp: Baseline
    dp_sizing: DpSizing
    chosen: dict  # the deployed plan's prediction when it was chosen (before its own pass)
    during: DeployedPrediction | None  # calibrated on the measured burst's steps (diagnosis)
    planned_measured: against_plan.Measured  # the deployed plan's burst (its failures)

    @property
    def best_baseline(self) -> Baseline | None:
        """The best measured baseline that met the bound (None: none did)."""
        return best_met([self.static, self.continuous_dp])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task ids")
    parser.add_argument("--bounds", default="1,2", help="which bounds: 1 (30%%), 2 (70%%)")
    parser.add_argument("--length-scale", type=float, default=0.25, help="task lengths x this")
    parser.add_argument(
        "--num-requests", type=int, help="per run (default: 4 x B_D or 15 s predicted, 64..1000)"
    )
    parser.add_argument("--devices", type=int, default=2, help="processes (devices)")
    add_headroom_argument(parser)  # the plan and both baselines are chosen under it alike
    parser.add_argument("--profile", type=Path, help="a profile (default: the cached one)")
    parser.add_argument(
        "--profile-dir", type=Path, default=autoplan.DEFAULT_PROFILE_DIR.expanduser()
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate the profile on the continuous baseline's deployment first, then "
        "plan again from the calibrated profile, and deploy and judge that plan (the "
        "uncalibrated choice beside it)",
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser.parse_args()


def plan_request(args: argparse.Namespace, task: str, bound: str) -> autoplan.PlanRequest:
    return autoplan.PlanRequest(
        workload=f"task:{task}",
        latency_bound=bound,
        latency_headroom=args.latency_headroom,
        num_devices=args.devices,
        length_scale=args.length_scale,
        threads=1,
        profile_dir=args.profile_dir,
        profile=args.profile,
    )


def static_bounds(args: argparse.Namespace, task: str, profile: Path) -> list[float]:
    from services.scheduler.search.plan import static_latency_bounds

    problem = autoplan.build_problem(plan_request(args, task, "inf"), profile)
    return static_latency_bounds(problem, BOUND_QUANTILES)


def calibrated_plan(
    request: autoplan.PlanRequest,
    task: str,
    first: autoplan.AutoPlan,
    profile: Path,
    totals: dict,
) -> tuple[autoplan.AutoPlan, FirstChoice, Calibration]:
    """The plan made again from a copy of `profile` calibrated by `totals` (the first choice
    stays when no schedule meets the bound on the calibrated profile)."""
    name = f"{profile.stem}.cal-{task}-{first.bound_s:.3g}"
    again = recalibrate(first, request, profile, totals, first.path.parent, name)
    if again.refused is not None:
        outcome = f"{NONE_MEETS} ({again.refused})"
        sys.stderr.write("re-planned after calibration:\n" + autoplan.format_choice(first) + "\n")
    else:
        same = again.plan.report["schedule"] == first.report["schedule"]
        outcome = "kept" if same else "changed"
        sys.stderr.write(
            "re-planned after calibration:\n" + autoplan.format_choice(again.plan) + "\n"
        )
    choice = FirstChoice(first.predicted, again.first_calibrated, outcome)
    return again.plan, choice, again.calibration


@dataclass(frozen=True)
class RowRun:
    """One row's task, tag and scratch folder, and how its bursts are sized."""

    args: argparse.Namespace
    task: str
    tag: str
    s99: int
    work: Path

    def burst(self, name: str, running: int, predicted_seq_s: float) -> Burst:
        """A warm-up and a measured burst sized for `running` sequences at once."""
        num = burst_size(self.args, running, predicted_seq_s)
        out = self.work / f"{self.tag}-{name}.json"
        return Burst(self.task, num, warmup_requests(running), self.s99, out)

    def plan_burst(self, name: str, plan: autoplan.AutoPlan) -> Burst:
        return self.burst(name, running_batches(plan), plan.predicted["throughput_seq_s"])


def choose(
    run: RowRun, request: autoplan.PlanRequest, first: autoplan.AutoPlan, profile: Path
) -> tuple[autoplan.AutoPlan, FirstChoice, Calibration]:
    """The plan to deploy: the first, or (calibrating) the re-plan after a pass on continuous
    DP sized from the first plan, in its own deployment."""
    if not run.args.calibrate:
        return first, FirstChoice(first.predicted, None, "not re-planned"), Calibration()
    work = run.work / f"{run.tag}-cal"
    sizing = first_plan_sizing(first.report)
    calibrating = dp_config(sizing, first, profile, work)
    size = first_plan_pass(first, sizing)
    totals = calibrate_on(calibrating, run.args, run.task, size, work)
    return calibrated_plan(request, run.task, first, profile, totals)


def run_planned(
    run: RowRun,
    auto: autoplan.AutoPlan,
    request: autoplan.PlanRequest,
    profile: Path,
    calibration: Calibration,
) -> tuple[against_plan.Measured, dict, str, DeployedPrediction | None]:
    """The deployed plan measured: (measured, its prediction, the calibration that made it,
    the prediction from the measured burst's own steps or None)."""
    config = planned_config(auto, Path(auto.report["profile"]), run.work / f"{run.tag}-planned")
    if not run.args.calibrate:
        planned = measure(config, run.args, run.plan_burst("planned", auto))
        return planned, auto.predicted, calibration.describe(), None
    own = Calibrating(request, profile, calibration, run.work / f"{run.tag}-own", f"{run.tag}-own")
    done = measure_planned(config, run.args, run.plan_burst("planned", auto), auto, own)
    before = done.before
    return done.measured, before.predicted, before.calibration.describe(), done.during


def run_row(args: argparse.Namespace, task: str, bound_s: float, profile: Path, work: Path) -> Row:
    request = plan_request(args, task, f"{bound_s:.6f}")
    first = autoplan.make_plan(request, profile, work)
    sys.stderr.write(autoplan.format_choice(first) + "\n")
    run = RowRun(args, task, f"{task}-{bound_s:.3g}", int(first.report["output_p99_tokens"]), work)
    auto, choice, calibration = choose(run, request, first, profile)
    planned, predicted, deployed_on, during = run_planned(run, auto, request, profile, calibration)
    plan_profile = Path(auto.report["profile"])
    plan_request_ = replace(request, profile=plan_profile)
    static_plan = baseline_plan(auto, ScheduleKind.STATIC.value, plan_request_, plan_profile)
    static = None
    if static_plan is auto:
        static = planned
    elif static_plan is not None:
        static_config = planned_config(static_plan, plan_profile, work / f"{run.tag}-static")
        static = measure(static_config, args, run.plan_burst("static", static_plan))
    at_devices = None
    if not choice.refused:  # refused: nothing, continuous included, meets it calibrated
        at_devices = continuous_at_devices(auto.report, plan_request_, plan_profile, bound_s)
    sizing = size_dp(at_devices, first.report, "calibrated" if args.calibrate else "uncalibrated")
    dp_seq_s = (at_devices or auto.predicted)["throughput_seq_s"]
    dp_burst = run.burst("dp", sizing.running_batch, dp_seq_s)
    dp = measure(dp_config(sizing, auto, plan_profile, work / f"{run.tag}-dp"), args, dp_burst)
    return Row(
        task, bound_s, auto.report["chosen_kind"], auto.predicted["describe"],
        against_plan.compare(predicted, planned, bound_s), choice, deployed_on,
        Baseline("static", static, bound_s), Baseline("continuous-DP", dp, bound_s), sizing,
        auto.predicted, during, planned,
    )  # fmt: skip


def _ratio(value: float, base: Baseline | None) -> str:
    if base is None or base.measured is None or not base.measured.throughput_seq_s:
        return "-"
    if not valid(base.measured) or math.isnan(value):
        return "-"
    return f"{value / base.measured.throughput_seq_s:.2f}"


def _seq_s(base: Baseline) -> str:
    return f"{base.measured.throughput_seq_s:.2f}" if base.measured else "-"


MET = {True: "yes", False: "no", None: "-"}


def format_rows(rows: list[Row]) -> str:
    """The table of deployed plans, then per row its first (uncalibrated) choice and how the
    continuous baseline was sized. A baseline's "met" is its measured p99-length latency
    within the bound; "vs best" divides by the best measured baseline that met it. "fail" is
    each burst's failed requests, "!" after it when over 1% failed: that measurement is
    invalid (it meets no bound and no ratio is taken with it)."""
    percent = against_plan.percent
    header = (
        f"{'task':<5}{'bound s':>8}  {'kind':<11}{'seq/s pred':>11}{'meas':>7}{'err':>6}"
        f"{'lat s pred':>11}{'meas':>7}{'err':>6}{'met':>5}{'fail':>6}{'static':>8}{'met':>5}"
        f"{'fail':>6}{'cont-DP':>8}{'met':>5}{'fail':>6}{'vs static':>10}{'vs DP':>7}"
        f"{'vs best':>8}"
    )
    lines = [header]
    for row in rows:
        c, static, dp = row.planned, row.static, row.continuous_dp
        ok = valid(row.planned_measured)
        seq_s = c.measured_seq_s if ok else math.nan
        lines.append(
            f"{row.task:<5}{row.bound_s:8.2f}  {row.kind:<11}{c.predicted_seq_s:11.2f}"
            f"{c.measured_seq_s:7.2f}{percent(c.throughput_error):>6}"
            f"{c.predicted_latency_s:11.2f}{c.measured_latency_s:7.2f}"
            f"{percent(c.latency_error):>6}{MET[c.meets_bound and ok]:>5}"
            f"{failed_cell(row.planned_measured):>6}"
            f"{_seq_s(static):>8}{MET[static.meets_bound]:>5}{failed_cell(static.measured):>6}"
            f"{_seq_s(dp):>8}{MET[dp.meets_bound]:>5}{failed_cell(dp.measured):>6}"
            f"{_ratio(seq_s, static):>10}{_ratio(seq_s, dp):>7}"
            f"{_ratio(seq_s, row.best_baseline):>8}"
        )
    if not all(valid(m) for r in rows for m in _bursts(r)):
        lines.append("! more than 1% of that burst's requests failed: its measurement is INVALID")
    lines += [""]
    for r in rows:
        lines.append(f"{r.task} @ {r.bound_s:.2f} s: deployed {r.describe}; {r.calibration}")
        lines.append(f"  when chosen it was predicted {_figures(r.chosen)}")
        if r.during is not None:
            lines.append(f"  {_during(r.planned, r.during)}")
        lines.append(f"  first choice (uncalibrated, {r.first.replanned}): {_first(r.first)}")
        lines.append(f"  continuous DP baseline: {r.dp_sizing.source}")
    return "\n".join(lines)


def _bursts(row: Row) -> list[against_plan.Measured | None]:
    return [row.planned_measured, row.static.measured, row.continuous_dp.measured]


def _figures(predicted: dict) -> str:
    return f"{predicted['throughput_seq_s']:.2f} seq/s, {predicted['latency_s']:.2f} s"


def _during(planned: against_plan.Comparison, during: DeployedPrediction) -> str:
    """The deployed plan priced with its steps as the measured burst ran them."""
    percent = against_plan.percent
    seq_s, latency_s = during.predicted["throughput_seq_s"], during.predicted["latency_s"]
    seq_err = against_plan.relative_error(planned.measured_seq_s, seq_s)
    lat_err = against_plan.relative_error(planned.measured_latency_s, latency_s)
    return (
        f"steps as the measured burst ran them ({during.calibration.describe()}): predicted "
        f"{seq_s:.2f} seq/s ({percent(seq_err)}), {latency_s:.2f} s ({percent(lat_err)})"
    )


def _first(first: FirstChoice) -> str:
    text = f"{first.predicted['describe']}, predicted {_figures(first.predicted)}"
    if first.calibrated is not None:
        text += f"; calibrated it predicts {_figures(first.calibrated)}"
    return text


def main() -> int:
    args = parse_args()
    tasks = [t.strip().upper() for t in args.tasks.split(",") if t.strip()]
    which = [int(b) for b in args.bounds.split(",") if b.strip()]
    if not set(tasks) <= set(TASKS) or not set(which) <= {1, 2}:
        sys.stderr.write(f"--tasks takes {','.join(TASKS)}; --bounds takes 1,2\n")
        return 2
    request = plan_request(args, tasks[0], "inf")
    profile = autoplan.ensure_profile(request, sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="exegpt-schedules-"))
    rows = []
    for task in tasks:
        bounds = static_bounds(args, task, profile)
        for index in which:
            rows.append(run_row(args, task, bounds[index - 1], profile, work))
            sys.stderr.write("\n".join(format_rows(rows[-1:]).splitlines()[1:]) + "\n")
    sys.stdout.write(
        f"{args.devices} devices ({args.devices} processes x 1 thread), lengths x"
        f"{args.length_scale:g}, bounds = static batching's {BOUND_QUANTILES} latency quantiles"
        f" ({planned_against(args.latency_headroom)}; met: within the bound);"
        f" profile {profile}; runs in {work}\n\n{format_rows(rows)}\n"
    )
    if args.json:
        args.json.write_text(json.dumps([row_json(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
