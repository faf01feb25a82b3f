"""Predicted vs measured: the simulator's baselines against real serving, on 1 device.

For each task, batching mode and batch size, `exegpt simulate` (services/scheduler/simulate.py)
predicts the schedule on the given profile, then a local deployment (`exegpt up`'s launcher,
one replica) runs it and `exegpt bench` drives it at saturation with the same workload
(lengths scaled alike). With --calibrate (the default) each deployment first serves a
calibration pass whose engine-clock totals calibrate the profile kind by kind
(exegpt/commands/calibration_pass.py), sized by the rule every calibration pass follows
(exegpt/bench/burst.py `calibration_pass_size`: 2 running batches, 5 s at the uncalibrated
profile's predicted rate, 64 decode steps, whichever is most); the row's prediction is then
the calibrated one, and the uncalibrated one's error is printed beside it. The row's second
line names the pass's size and what it calibrated. A third prediction ('self') is calibrated on
the measured burst's own engine clock: the load of a shared machine changes between the
calibration burst and the measured one, and this one has no such gap, so its error is the
model's own (how it composes steps into throughput and latency), not the machine's drift.
Every prediction and calibration is made on the lengths its burst actually sent (the
burst's prompts and outputs as a trace, `sent_workload`), the latency at the task's p99
length: a burst's seeded draws run a few percent off its task's distribution.
Measured figures are read as
`exegpt bench --against-plan` reads them (exegpt/bench/against_plan.py): steady-state seq/s
and the p99-length latency. Prints one row per run as it finishes, then the median and
worst absolute errors and their signs. A run whose measured (or calibration) burst completed
no request is a row of NaN figures with a note saying why, left out of the summaries; the
next run goes on. `--seed` draws every burst's lengths and prompts (default 0: every run
sends the same ones).

    .venv/bin/python benchmarks/fidelity.py --profile quick.json            # 30 runs
    .venv/bin/python benchmarks/fidelity.py --profile quick.json --tasks S --batch-sizes 32

The machine is shared and noisy: read the errors as such, and rerun a subset to check one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployments import free_port  # noqa: E402

from exegpt.bench.against_plan import measure, percent, relative_error, run_bench  # noqa: E402
from exegpt.bench.burst import calibration_pass_size  # noqa: E402
from exegpt.commands.calibration_pass import (  # noqa: E402
    calibrated_copy,
    calibration_burst,
    calibration_from_totals,
    engine_totals,
    totals_between,
)
from exegpt.launcher import Deployment, DeploymentConfig  # noqa: E402
from services.scheduler.simulate import PredictRequest, predict, workload_of  # noqa: E402

TASKS = ("S", "T", "G", "C1", "C2")
MODES = ("static", "continuous")
TARGET_MEDIAN, TARGET_WORST = 0.10, 0.20
TRACE_TIME = "2026-01-01 00:00:00.0"  # a sent burst as a trace: its arrivals do not matter


@dataclass(frozen=True)
class Run:
    task: str
    mode: str
    batch_size: int
    num_requests: int
    predicted_seq_s: float
    measured_seq_s: float
    predicted_latency_s: float
    measured_latency_s: float
    uncalibrated_seq_s: float  # the prediction before the calibration pass
    uncalibrated_latency_s: float
    self_seq_s: float  # the prediction calibrated on the measured burst's own engine clock
    self_latency_s: float
    calibration: str  # what the pass corrected ('uncalibrated' without one)
    num_failed: int
    busy_fraction: float  # the engine's forward time / busy wall time during the run
    decode_host_ms: float  # the engine's host work per decode step (engine clock)
    note: str = ""  # why the row has no figures (NaN), when it has none
    calibration_requests: int = 0  # the calibration pass's requests (0: none)

    @property
    def seq_error(self) -> float:
        return relative_error(self.measured_seq_s, self.predicted_seq_s)

    @property
    def latency_error(self) -> float:
        return relative_error(self.measured_latency_s, self.predicted_latency_s)

    @property
    def self_seq_error(self) -> float:
        return relative_error(self.measured_seq_s, self.self_seq_s)

    @property
    def self_latency_error(self) -> float:
        return relative_error(self.measured_latency_s, self.self_latency_s)

    @property
    def uncalibrated_seq_error(self) -> float:
        return relative_error(self.measured_seq_s, self.uncalibrated_seq_s)

    @property
    def uncalibrated_latency_error(self) -> float:
        return relative_error(self.measured_latency_s, self.uncalibrated_latency_s)


def one_run(args: argparse.Namespace, task: str, mode: str, batch: int, scratch: Path) -> Run:
    schedule = f"{mode}:encode_batch_size={batch},decode_batch_size={batch}"
    workload = f"task:{task}"
    # The latency is the task's p99-length request's, whatever lengths a burst drew.
    p99_tokens = workload_of(workload, args.length_scale, 1 << 30).output_p99_tokens

    def predicted_by(profile: str, sent: str) -> dict:
        request = PredictRequest(
            profile=profile,
            workload=sent,
            num_devices=1,
            schedule=schedule,
            latency_output_tokens=p99_tokens,
        )
        return predict(request)

    num_requests = max(args.min_requests, args.requests_per_slot * batch)
    calibration_requests = 0
    if args.calibrate:
        calibration_requests = pass_size(args.profile, task, schedule, batch, args.length_scale)
    config = DeploymentConfig(
        batching=mode, max_batch_size=batch, log_dir=scratch, startup_timeout_s=300.0
    )
    config = replace(config, http_port=free_port(), grpc_port=free_port())
    name = f"{task}-{mode}-{batch}"
    with Deployment(config) as deployment:
        worker = deployment.worker_addresses[0]
        if args.calibrate:
            work = scratch / f"{name}-calibration"
            work.mkdir(exist_ok=True)
            calibration_totals = calibration_burst(
                deployment, workload, calibration_requests, work, args.length_scale,
                warmup_requests=batch, seed=args.seed,
            )  # fmt: skip
        before = engine_totals(worker)
        document = run_bench(
            deployment.http_url, workload, num_requests, scratch / f"{name}.json",
            args.length_scale, args.seed,
        )  # fmt: skip
        totals = totals_between(before, engine_totals(worker))
    if (unmeasured := no_completions(document, "measured")) is not None:
        return unmeasured_run(task, mode, batch, num_requests, document, unmeasured)
    if args.calibrate and (
        unmeasured := no_completions(calibration_document_of(work), "calibration")
    ):
        return unmeasured_run(task, mode, batch, num_requests, document, unmeasured)
    # Every prediction and calibration is on the lengths its burst sent (`sent_workload`).
    sent = sent_workload(document, scratch / f"{name}.sent.csv")
    uncalibrated = predicted_by(args.profile, sent)
    predicted, calibration = uncalibrated, "uncalibrated"
    if args.calibrate:
        calibration_document = calibration_document_of(work)
        calibration_sent = sent_workload(calibration_document, work / "calibration.sent.csv")
        calibrated = calibration_from_totals(
            args.profile, calibration_sent, None, calibration_totals
        )
        profile = calibrated_copy(args.profile, calibrated, scratch, f"{name}-calibrated")
        predicted, calibration = predicted_by(profile, sent), calibrated.describe()
    self_calibration = calibration_from_totals(args.profile, sent, None, totals)
    self_profile = calibrated_copy(args.profile, self_calibration, scratch, f"{name}-self")
    self_predicted = predicted_by(self_profile, sent)
    measured = measure(document, p99_tokens)
    decode = totals.get("decode")
    return Run(
        task, mode, batch, num_requests,
        predicted["predicted"]["throughput_seq_s"], measured.throughput_seq_s,
        predicted["predicted"]["latency_s"], measured.p99_length_latency_s,
        uncalibrated["predicted"]["throughput_seq_s"], uncalibrated["predicted"]["latency_s"],
        self_predicted["predicted"]["throughput_seq_s"], self_predicted["predicted"]["latency_s"],
        calibration, measured.num_failed, busy_fraction(totals),
        1e3 * decode.host_s / max(1, decode.num_steps) if decode else math.nan,
        calibration_requests=calibration_requests,
    )  # fmt: skip


def pass_size(profile: str, task: str, schedule: str, batch: int, length_scale: float) -> int:
    """The calibration pass's requests by the rule every pass follows (exegpt/bench/burst.py),
    sized before the pass: at the rate `profile` (uncalibrated) predicts for `schedule` on the
    task's lengths as the bench sends them (scaled), and their mean output."""
    workload = f"task:{task}"
    query = PredictRequest(
        profile=profile,
        workload=workload,
        num_devices=1,
        schedule=schedule,
        length_scale=length_scale,
    )
    rate = predict(query)["predicted"]["throughput_seq_s"]
    lengths = workload_of(workload, length_scale, 1 << 30)
    return calibration_pass_size(batch, rate, lengths.mean_output_tokens)


def calibration_document_of(work: Path) -> dict:
    return json.loads((work / "calibration.json").read_text())


def no_completions(document: dict, burst: str) -> str | None:
    """Why a burst cannot be predicted or measured (none of its requests completed, so
    there are no lengths to predict on), or None when some completed."""
    if any(r["error"] is None and r["output_tokens"] for r in document["requests"]):
        return None
    errors = sorted({r["error"] for r in document["requests"] if r["error"]})
    shown = "; ".join(errors[:3]) or "no output tokens"
    return f"no request of the {burst} burst completed ({shown}): nothing to predict on"


def unmeasured_run(
    task: str, mode: str, batch: int, num_requests: int, document: dict, note: str
) -> Run:
    """A row without figures (NaN): the run goes on to the next one."""
    nan = math.nan
    num_failed = int(document["metrics"]["num_failed"])
    return Run(
        task, mode, batch, num_requests, nan, nan, nan, nan, nan, nan, nan, nan,
        "not calibrated", num_failed, nan, nan, note,
    )  # fmt: skip


def sent_workload(document: dict, path: Path) -> str:
    """The lengths a bench burst sent (its completed requests' prompts and outputs) as a
    trace workload, written to `path`. A burst of a hundred requests draws lengths a few
    percent off its task's distribution (seeded, so always the same way: +4-6% on the outputs
    of every task at 96-256 requests); predicting on the task would blame the model for it."""
    rows = [r for r in document["requests"] if r["error"] is None and r["output_tokens"]]
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{TRACE_TIME},{r['input_tokens']},{r['output_tokens']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return f"trace:{path}"


def busy_fraction(totals: dict) -> float:
    forward_s = sum(t.forward_s for t in totals.values())
    wall_s = forward_s + sum(t.host_s for t in totals.values())
    return forward_s / wall_s if wall_s > 0 else math.nan


HEADER = (
    f"{'task':<5}{'mode':<11}{'batch':>6}{'reqs':>6} {'pred seq/s':>11}{'meas seq/s':>11}"
    f"{'err':>7}{'uncal':>7}{'self':>7} {'pred p99 s':>11}{'meas p99 s':>11}{'err':>7}"
    f"{'uncal':>7}{'self':>7}"
    f"{'failed':>7}{'busy':>6}{'host ms/dec':>12}"
)


def row(run: Run) -> str:
    """One run; 'uncal' is the error against the prediction before calibration, 'self'
    against the one calibrated on the measured burst itself."""
    return (
        f"{run.task:<5}{run.mode:<11}{run.batch_size:>6}{run.num_requests:>6} "
        f"{run.predicted_seq_s:>11.3f}{run.measured_seq_s:>11.3f}{percent(run.seq_error):>7}"
        f"{percent(run.uncalibrated_seq_error):>7}{percent(run.self_seq_error):>7} "
        f"{run.predicted_latency_s:>11.3f}{run.measured_latency_s:>11.3f}"
        f"{percent(run.latency_error):>7}{percent(run.uncalibrated_latency_error):>7}"
        f"{percent(run.self_latency_error):>7}"
        f"{run.num_failed:>7}{run.busy_fraction:>6.0%}{run.decode_host_ms:>12.2f}\n"
        f"     {run.note or pass_line(run)}"
    )


def pass_line(run: Run) -> str:
    """What the row's calibration pass was and what it corrected."""
    if not run.calibration_requests:
        return run.calibration
    return f"pass of {run.calibration_requests} requests: {run.calibration}"


def summary(label: str, errors: list[float]) -> str:
    errors = [e for e in errors if not math.isnan(e)]
    if not errors:
        return f"{label}: no measurement"
    absolute = [abs(e) for e in errors]
    median, worst = statistics.median(absolute), max(absolute)
    over = sum(e > 0 for e in errors)
    under = sum(e < 0 for e in errors)
    verdict = (
        "meets"
        if median <= TARGET_MEDIAN and worst <= TARGET_WORST and over and under
        else "misses"
    )
    return (
        f"{label}: median |error| {median:.1%}, worst {worst:.1%}; {over} measured above the "
        f"prediction, {under} below ({verdict} the targets: median <= {TARGET_MEDIAN:.0%}, "
        f"worst <= {TARGET_WORST:.0%}, both signs)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="profile JSON (`exegpt profile`)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task ids")
    parser.add_argument("--modes", default=",".join(MODES), help="static,continuous")
    parser.add_argument("--batch-sizes", default="8,16,32", help="comma-separated")
    parser.add_argument(
        "--length-scale",
        type=float,
        default=0.25,
        help="multiply every input and output length (prediction and bench alike) so a full "
        "run fits in about 15 minutes on 2 cores",
    )
    parser.add_argument(
        "--requests-per-slot", type=int, default=4, help="measured requests per batch slot"
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=32,
        help="measured requests per run at least (a calibration pass is sized by its own rule)",
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="before each measured burst, a short burst calibrates the profile by kind and "
        "the row predicts from the calibrated profile (the uncalibrated error is beside it)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds every burst's lengths and prompts"
    )
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="exegpt-fidelity-"))
    sys.stdout.write(
        f"fidelity on 1 device: profile {args.profile}, lengths x{args.length_scale:g}, "
        f"{args.requests_per_slot} requests per slot (at least {args.min_requests}), "
        f"{'calibrated' if args.calibrate else 'uncalibrated'}, seed {args.seed}\n{HEADER}\n"
    )
    runs: list[Run] = []
    for task in tasks:
        for mode in modes:
            for batch in batches:
                runs.append(one_run(args, task, mode, batch, scratch))
                sys.stdout.write(row(runs[-1]) + "\n")
                sys.stdout.flush()
    sys.stdout.write(summary("throughput (seq/s)", [r.seq_error for r in runs]) + "\n")
    sys.stdout.write(summary("p99-length latency", [r.latency_error for r in runs]) + "\n")
    if args.calibrate:
        uncal_seq = [r.uncalibrated_seq_error for r in runs]
        uncal_latency = [r.uncalibrated_latency_error for r in runs]
        sys.stdout.write(summary("  uncalibrated seq/s", uncal_seq) + "\n")
        sys.stdout.write(summary("  uncalibrated latency", uncal_latency) + "\n")
    sys.stdout.write(summary("  self-calibrated seq/s", [r.self_seq_error for r in runs]) + "\n")
    own_latency = [r.self_latency_error for r in runs]
    sys.stdout.write(summary("  self-calibrated latency", own_latency) + "\n")
    for mode in modes:
        chosen = [r for r in runs if r.mode == mode]
        sys.stdout.write(summary(f"  {mode} seq/s", [r.seq_error for r in chosen]) + "\n")
        sys.stdout.write(summary(f"  {mode} latency", [r.latency_error for r in chosen]) + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    sys.stdout.write(f"bench reports and logs: {scratch}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
