"""`exegpt demo`: the README's main job, the product's whole loop in a few minutes.

It profiles the embedded default model on this machine (cached; a small grid), plans the
best schedule for a latency bound on 2 devices (2 stage processes here), deploys that
schedule (router + worker + stage processes) and sends a few requests through the gRPC SDK
and the OpenAI-compatible HTTP gateway (plain and streaming). Then it closes the loop:

1. observe: a warm-up and a calibration burst, whose engine clock (GetStats step totals)
   calibrates a copy of the profile kind by kind (exegpt/commands/calibration_pass.py);
2. re-plan: the same bound planned again from the calibrated copy;
3. apply: a changed schedule is deployed in place of the first one (this demo runs no
   scheduler service to push it live: a new deployment; an unchanged one keeps serving),
   and its deployment serves a calibration pass of its own: factors read on one
   deployment's steps (its batch sizes, its placement) do not carry to another's, so the
   plan in force is priced on its own steps, as benchmarks/schedules.py prices its rows;
4. measure: a saturating burst, against that prediction of the plan in force.

It prints the first plan, the re-plan (and what the calibrated profile predicts for the
first choice) and the measured figures, and shuts down.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from exegpt.bench import against_plan
from exegpt.bench.burst import (
    MIN_CALIBRATION_REQUESTS,
    measured_burst,
    plan_calibration_pass,
    running_sequences,
)
from exegpt.commands import autoplan, calibration_pass
from exegpt.launcher import Deployment, DeploymentConfig
from exegpt.schedule_proto import schedule_from_proto
from exegpt.sdk import Client
from exegpt.topology import Topology
from exegpt.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:  # the scheduler's library is imported where it is used (autoplan.py)
    from services.scheduler.calibration import Calibration

DESCRIPTION = "start a local deployment, send a few requests, print answers"
logger = logging.getLogger("exegpt.demo")

# The demo's measured burst follows the benchmarks' rule (4 running batches for every worker
# replica) but is the README's quick main command (about 30 s with a cached profile), not a
# benchmark: it lasts at least 3 s at the predicted rate (the benchmarks' 15 s would make it
# several times longer) and at most 1000 requests, 11 to 15 s at the 65 to 88 seq/s the
# default model served here. At the demo's bound (10% quantile of static latencies) plans
# here ran B_D 84 to 132 per replica on one or two replicas, so 4 running batches mostly fit
# under the cap; past 250 sequences running in all the burst has fewer batches than the rule
# wants (`--burst N` sends more).
DEMO_STEADY_S = 3.0
DEMO_MAX_REQUESTS = 1000
# Its calibration pass follows the rule every pass follows (exegpt/bench/burst.py: running
# batches, seconds at the predicted rate, decode steps on every replica) with the same steady
# time, capped at half the measured burst (at least 32), the size it had before the rule: the
# demo's large batches of short outputs ask for more decode steps than that holds (64 steps of
# B_D 132 on each of 2 replicas at 8 output tokens is 2414 requests), so the pass is mostly
# capped and the main command is never slower for the rule; `exegpt demo` shows the loop, the
# benchmarks measure how well it predicts.

PROMPTS = ("Translate to German: The house is small.", "def fibonacci(n):", "Hello, exegpt!")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DeploymentConfig.model, help="model name or HF directory"
    )
    parser.add_argument("--replicas", type=int, default=1, help="worker processes")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per demo answer")
    parser.add_argument(
        "--burst",
        type=int,
        default=None,
        help="requests sent at once to measure the schedule (default: 4 x B_D per worker "
        "replica and 3 s at the predicted rate, 64..1000); with --burst the calibration "
        "pass before it is half as many (at least 32), without it the most of 2 x B_D per "
        "replica, 3 s at the predicted rate and 64 decode steps per replica, 32..500",
    )
    autoplan.add_arguments(parser, plan_flag=False)
    # Task S with a quarter of its lengths: short steps keep the burst brief on a CPU. The
    # bound (10% quantile of static latencies) keeps B_D small enough that a burst of 4 x B_D
    # per replica reaches a steady state.
    parser.set_defaults(length_scale=0.25, latency_bound="auto:0.1")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _http_completion(base_url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _http_stream(base_url: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps({**payload, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    return events


def run(args: argparse.Namespace) -> int:
    start_s = time.monotonic()
    try:
        request = autoplan.request_from_args(args, args.replicas)
        profile = autoplan.ensure_profile(request)
        first = autoplan.make_plan(request, profile)
    except ValueError as exc:
        sys.stderr.write(f"exegpt demo: {exc}\n")
        return 2
    _out("First plan, on the uncalibrated profile:")
    _out(autoplan.format_choice(first))
    _out()
    log_dir = Path(tempfile.mkdtemp(prefix="exegpt-demo-logs-"))
    replicas = first.plan.num_workers(args.replicas)
    _out(f"Deploying it: router + {replicas} worker replica(s) of {args.model} ...")
    with Deployment(_config(args, first, profile, request.threads, log_dir)) as deployment:
        _print_endpoints(deployment, log_dir)
        _run_requests(deployment, args.max_tokens)
        _out()
        auto, calibration = _replan(deployment, first, request, profile, args, log_dir)
        if auto.report["schedule"] == first.report["schedule"]:
            _out("The re-plan keeps the deployed schedule: measuring it as it runs.")
            _run_burst(deployment, auto, auto.predicted, args, log_dir)
    if auto.report["schedule"] != first.report["schedule"]:
        again = _apply(args, auto, request, profile, calibration, log_dir, final=False)
        if again is not None:
            _apply(args, again.plan, request, profile, again.calibration, log_dir, final=True)
    _out(f"All services stopped ({time.monotonic() - start_s:.0f} s in all).")
    return 0


def _config(
    args: argparse.Namespace, auto: autoplan.AutoPlan, profile: Path, threads: int, log_dir: Path
) -> DeploymentConfig:
    """The deployment of `auto`: its placement, control variables and KV pool."""
    return DeploymentConfig(
        model=args.model,
        num_replicas=auto.plan.num_workers(args.replicas),
        http_port=0,
        grpc_port=0,
        log_dir=log_dir,
        schedule_file=auto.path,
        max_batch_size=auto.plan.schedule.decode_batch_size,
        kv_cache_mb=autoplan.kv_cache_mb(auto, profile),
        topology=Topology(planned=auto.plan.placement, threads_per_device=threads),
        extra_worker_args=("--max-queue-size", str(max(1024, args.burst or 0))),
    )


def _replan(
    deployment: Deployment,
    first: autoplan.AutoPlan,
    request: autoplan.PlanRequest,
    profile: Path,
    args: argparse.Namespace,
    log_dir: Path,
) -> tuple[autoplan.AutoPlan, Calibration]:
    """Observe a calibration burst, calibrate a copy of the profile and plan again on it at
    the same bound; the first plan stays when no schedule meets the bound calibrated."""
    header = "Calibration: a warm-up, then {} requests; the engine clock calibrates the profile"
    totals = _calibration_totals(deployment, first, args, log_dir, header)
    again = calibration_pass.recalibrate(first, request, profile, totals, log_dir, "calibrated")
    _out(f"  {again.calibration.describe()}")
    _out_prediction("the first plan, calibrated", again.first_calibrated, first.bound_s)
    if again.refused is not None:
        _out(f"  re-plan: {again.refused}; keeping the first plan")
        return again.plan, again.calibration
    _out("Re-plan, on the calibrated profile:")
    _out(autoplan.format_choice(again.plan))
    _out()
    return again.plan, again.calibration


def _apply(
    args: argparse.Namespace,
    auto: autoplan.AutoPlan,
    request: autoplan.PlanRequest,
    profile: Path,
    calibration: Calibration,
    log_dir: Path,
    final: bool,
) -> calibration_pass.Recalibrated | None:
    """Deploy the re-plan `auto` in place of the plan before it, price it on its own steps
    and measure it with a burst. Factors read on another deployment's steps (other batch
    sizes, encoders on devices of their own) may not carry to these: when on its own steps
    it misses the bound and a plan made from them differs, that plan is returned instead,
    unmeasured (not when `final`: the loop goes round at most twice)."""
    name = "replan-2" if final else "replan-1"
    _out("Applying the re-plan: deploying it in place of the plan before it ...")
    config = _config(args, auto, Path(auto.report["profile"]), request.threads, log_dir)
    with Deployment(config) as deployment:
        header = "Its own calibration pass: a warm-up, then {} requests"
        totals = _calibration_totals(deployment, auto, args, log_dir, header)
        own = calibration_pass.deployed_prediction(
            auto, request, profile, calibration, totals, log_dir, f"{name}-own"
        )
        predicted = own.predicted
        _out(f"  {own.calibration.describe()}")
        _out_prediction("the re-plan, calibrated on its own steps", predicted, auto.bound_s)
        if not final and predicted["latency_s"] > auto.bound_s:
            again = calibration_pass.recalibrate(
                auto, request, profile, totals, log_dir, name, earlier=calibration
            )
            if again.refused is not None:
                _out(f"On its own steps it misses the bound; re-plan: {again.refused}")
            elif again.plan.report["schedule"] == auto.report["schedule"]:
                _out("On its own steps it misses the bound; a re-plan from them keeps it")
            else:
                _out("On its own steps it misses the bound; re-plan from them:")
                _out(autoplan.format_choice(again.plan))
                _out()
                return again
        _run_burst(deployment, auto, predicted, args, log_dir)
    return None


def _calibration_totals(
    deployment: Deployment,
    auto: autoplan.AutoPlan,
    args: argparse.Namespace,
    log_dir: Path,
    header: str,
) -> dict[str, calibration_pass.KindTotals]:
    """A warm-up and a calibration pass sized for `auto` (`header` names its size), on
    `deployment`: the engines' clock totals by kind."""
    num = _calibration_size(auto, args)
    _out(header.format(num))
    return calibration_pass.calibration_burst(
        deployment, args.workload, num, log_dir, args.length_scale
    )


def _out_prediction(what: str, predicted: dict, bound_s: float) -> None:
    _out(
        f"  {what}, predicts {predicted['throughput_seq_s']:.2f} seq/s and "
        f"{predicted['latency_s']:.3f} s (bound {bound_s:.3f} s)"
    )


def _burst_size(auto: autoplan.AutoPlan, args: argparse.Namespace) -> int:
    """`--burst`, or the benchmarks' rule (exegpt/bench/burst.py: 4 running batches for every
    worker replica) with a demo's steady time and cap: see DEMO_STEADY_S."""
    running = running_sequences(auto.plan, args.replicas)
    return args.burst or measured_burst(
        running,
        auto.predicted["throughput_seq_s"],
        steady_s=DEMO_STEADY_S,
        max_requests=DEMO_MAX_REQUESTS,
    )


def _calibration_size(auto: autoplan.AutoPlan, args: argparse.Namespace) -> int:
    """Half of `--burst` (at least 32), or the rule every calibration pass follows
    (exegpt/bench/burst.py) with the demo's steady time, capped at half the measured burst."""
    half_burst = max(MIN_CALIBRATION_REQUESTS, _burst_size(auto, args) // 2)
    if args.burst:
        return half_burst
    return plan_calibration_pass(
        auto.plan,
        auto.predicted["throughput_seq_s"],
        args.replicas,
        steady_s=DEMO_STEADY_S,
        max_requests=half_burst,
    )


def _print_endpoints(deployment: Deployment, log_dir: Path) -> None:
    _out("ready:")
    _out(f"  OpenAI-compatible HTTP gateway  {deployment.http_url}/v1/completions")
    _out(f"  router gRPC (SDK)               {deployment.grpc_address}")
    for index, address in enumerate(deployment.worker_addresses):
        _out(f"  {f'worker replica {index} gRPC':<32}{address}")
    _out(f"  service logs                    {log_dir}")
    _out()
    _out("(The embedded default model has seeded random weights: its text is noise.)")


def _run_burst(
    deployment: Deployment,
    auto: autoplan.AutoPlan,
    predicted: dict,
    args: argparse.Namespace,
    log_dir: Path,
) -> None:
    """A saturating burst on the plan in force, measured against `predicted`."""
    report = auto.report
    burst = _burst_size(auto, args)
    for index, describe in enumerate(_in_force(deployment)):
        _out(f"In force on replica {index} (its GetSchedule): {describe}")
    _out(f"Burst: {burst} requests of {report['workload']} at once ...")
    document = against_plan.run_bench(
        deployment.http_url, args.workload, burst, log_dir / "burst.json", args.length_scale
    )
    measured = against_plan.measure(document, int(report["output_p99_tokens"]))
    result = against_plan.compare(predicted, measured, auto.bound_s)
    met = {True: "yes", False: "NO", None: "-"}[result.meets_bound]
    _out(
        f"schedule {auto.predicted['describe']} ({measured.num_ok} ok, "
        f"{measured.num_failed} failed)"
    )
    _out(f"  {'':28}{'predicted':>10}{'measured':>10}{'error':>8}")
    _out(
        f"  {'throughput (seq/s)':28}{result.predicted_seq_s:10.2f}{result.measured_seq_s:10.2f}"
        f"{against_plan.percent(result.throughput_error):>8}"
    )
    _out(
        f"  {'p99-length latency (s)':28}{result.predicted_latency_s:10.3f}"
        f"{result.measured_latency_s:10.3f}{against_plan.percent(result.latency_error):>8}"
    )
    _out(
        f"  latency bound {auto.bound_s:.3f} s met: {met}  (measured at steady state, "
        "admission to last token; see exegpt/latency.py)"
    )


def _in_force(deployment: Deployment) -> list[str]:
    """The schedule each replica reports it runs (Worker.GetSchedule)."""
    described = []
    for address in deployment.worker_addresses:
        with grpc.insecure_channel(address) as channel:
            status = worker_pb2_grpc.WorkerStub(channel).GetSchedule(
                worker_pb2.GetScheduleRequest(), timeout=10
            )
        described.append(schedule_from_proto(status.schedule).describe())
    return described


def _run_requests(deployment: Deployment, max_tokens: int) -> None:
    with Client(deployment.grpc_address) as client:
        for prompt in PROMPTS:
            completion = client.generate(prompt, max_tokens=max_tokens)
            _out(f"[gRPC SDK] {prompt!r}")
            _out(
                f"  -> {completion.text!r}\n     {completion.completion_tokens} tokens, "
                f"finish={completion.finish_reason}, ttft={completion.ttft_s * 1000:.1f} ms, "
                f"total={completion.latency_s * 1000:.1f} ms"
            )
        chunks = list(client.stream("Stream me", max_tokens=8, temperature=0.8, seed=7))
        _out(f"[gRPC SDK stream] {len(chunks)} chunks: {[c.token_ids for c in chunks]}")
    body = _http_completion(
        deployment.http_url,
        {"prompt": "Hello from HTTP", "max_tokens": max_tokens, "temperature": 0},
    )
    _out(f"[HTTP] POST /v1/completions -> {body['choices'][0]['text']!r}  usage={body['usage']}")
    events = _http_stream(
        deployment.http_url,
        {"prompt": [3, 50, 60, 70], "max_tokens": 6, "ignore_eos": True, "return_token_ids": True},
    )
    token_ids = [t for event in events for choice in event["choices"] for t in choice["token_ids"]]
    _out(f"[HTTP stream] {len(events)} server-sent events, token ids {token_ids}")
