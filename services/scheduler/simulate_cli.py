"""`exegpt simulate`: predict one given schedule on a profile and a workload.

    exegpt simulate --profile P --workload task:S --devices 1 \\
        --schedule continuous:encode_batch_size=32,decode_batch_size=32 [--json FILE]
    exegpt simulate --profile P --workload task:S --devices 2 --plan plan.json

Prints the predicted throughput and p99-length latency (and what the prediction prices:
the forwards, plus the serving path's host work when the profile measured it); `--json`
writes them with the keys `exegpt plan --json` uses. Bad input gives exit code 2 and a
one-line message. The work is done by services/scheduler/simulate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.scheduler.simulate import PredictRequest, predict
from services.scheduler.simulator.common import GIB

DESCRIPTION = "predict what one given schedule delivers (XSimulator)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile JSON, or analytic:DEVICE[:MODEL]")
    parser.add_argument("--model-config", help="HF config.json for an analytic:DEVICE profile")
    parser.add_argument("--workload", required=True, help="task:S|T|G|C1|C2 or trace:PATH")
    parser.add_argument(
        "--length-scale",
        type=float,
        help="multiply input and output lengths, as `exegpt bench --length-scale` does",
    )
    parser.add_argument("--devices", type=int, required=True, help="number of devices")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--schedule",
        help="KIND:field=value,... e.g. continuous:encode_batch_size=32,decode_batch_size=32 "
        "(kinds rra, waa-c, waa-m, static, continuous; fields encode_batch_size, "
        "decode_batch_size, num_decode_iterations, num_micro_batches, tp_degree, "
        "num_tp_devices, num_encode_devices)",
    )
    given.add_argument("--plan", help="a plan JSON from `exegpt plan --json`: its schedule")
    parser.add_argument("--gpu-memory-gb", type=float, help="memory per device in GiB")
    parser.add_argument("--json", help="write the prediction as JSON to this file")


def run(args: argparse.Namespace) -> int:
    request = PredictRequest(
        profile=args.profile,
        workload=args.workload,
        num_devices=args.devices,
        schedule=args.schedule,
        plan=args.plan,
        length_scale=args.length_scale,
        gpu_memory_gb=args.gpu_memory_gb,
        model_config=args.model_config,
    )
    try:
        report = predict(request)
    except ValueError as error:
        sys.stderr.write(f"exegpt simulate: error: {error}\n")
        return 2
    sys.stdout.write(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_report(report: dict[str, Any]) -> str:
    predicted = report["predicted"]
    overhead = report["serving_overhead"]
    memory = report["device_memory_bytes"]
    if any(overhead.values()):
        priced = (
            f"forwards + serving host work ({overhead['step_s'] * 1e3:.2f} ms/step, "
            f"{overhead['token_s'] * 1e3:.3f} ms/token, {overhead['request_s'] * 1e3:.2f} "
            "ms/request)"
        )
    else:
        priced = "forwards only (the profile has no serving section)"
    peak_gib = max(predicted["memory_bytes_per_device"]) / GIB
    fits = (
        "memory not judged (give --gpu-memory-gb)"
        if memory is None
        else f"{peak_gib:.2f} of {memory / GIB:.1f} GiB per device"
    )
    lines = [
        f"profile {report['profile']} ({report['model']}), {report['num_devices']} device(s)",
        f"workload {report['workload']} (p99 output {report['output_p99_tokens']} tokens)",
        f"schedule {predicted['describe']}",
        f"  predicted throughput {predicted['throughput_seq_s']:.3f} seq/s "
        f"({predicted['throughput_tokens_s']:.1f} tokens/s)",
        f"  predicted p99-length latency {predicted['latency_s']:.3f} s",
        f"  {fits}" + ("" if predicted["feasible"] else f": infeasible, {predicted['reason']}"),
        f"  priced: {priced}",
    ]
    return "\n".join(lines) + "\n"
