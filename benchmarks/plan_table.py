"""What XScheduler plans for each of the paper's five tasks, at a tight and a loose latency
bound, against the static-batching (FasterTransformer) baseline, and what the search costs
against exhaustive search. All numbers are the simulator's predictions from one profile.

For each task the bounds are derived from the lowest p99 latency any schedule can reach on
this profile, the baselines included (L_min): tight = 1.5 x L_min, loose = 4 x L_min (`--factors`).

    .venv/bin/python benchmarks/plan_table.py --profile /tmp/tiny-quick.json --gpus 4 \\
        --gpu-memory-gb 4

`--profile` also takes analytic:DEVICE[:MODEL] (see `exegpt plan --help`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from exegpt.schedule import ScheduleKind
from exegpt.workloads import TASKS
from services.scheduler.problem import PlanProblem, PlanResult, WorkloadDistribution
from services.scheduler.problem_builder import load_cost_model
from services.scheduler.search.plan import plan
from services.scheduler.simulator.common import GIB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="profile JSON or analytic:DEVICE")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--gpu-memory-gb", type=float, help="default: the profile's, if known")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task ids")
    parser.add_argument("--factors", default="1.5,4", help="bounds as multiples of L_min")
    parser.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive runs")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


def _throughput(result: PlanResult, kind: ScheduleKind) -> float | None:
    best = result.best_by_kind.get(kind.value)
    return best.throughput_seq_s if best else None


def _timed(problem: PlanProblem, exhaustive: bool) -> tuple[PlanResult, float]:
    start_s = time.perf_counter()
    result = plan(problem, exhaustive=exhaustive)
    return result, time.perf_counter() - start_s


def task_rows(base: PlanProblem, factors: list[float], exhaustive: bool) -> list[dict[str, Any]]:
    lowest = plan(replace(base, latency_bound_s=1e-9)).lowest_latency
    if lowest is None:
        raise ValueError(f"{base.workload.name}: no schedule fits in memory")
    rows = []
    for factor in factors:
        problem = replace(base, latency_bound_s=factor * lowest.latency_s)
        fast, fast_s = _timed(problem, exhaustive=False)
        row: dict[str, Any] = {
            "task": base.workload.name.removeprefix("task:"),
            "bound": f"{factor:g} x L_min",
            "latency_bound_s": problem.latency_bound_s,
            "chosen": fast.chosen.schedule.describe() if fast.chosen else None,
            "throughput_seq_s": fast.chosen.throughput_seq_s if fast.chosen else None,
            "latency_s": fast.chosen.latency_s if fast.chosen else None,
            "static_seq_s": _throughput(fast, ScheduleKind.STATIC),
            "continuous_seq_s": _throughput(fast, ScheduleKind.CONTINUOUS),
            "bnb_evaluations": fast.search.num_evaluations,
            "bnb_wall_s": fast_s,
        }
        if exhaustive:
            full, full_s = _timed(problem, exhaustive=True)
            row["exhaustive_evaluations"] = full.search.num_evaluations
            row["exhaustive_wall_s"] = full_s
            row["exhaustive_seq_s"] = full.chosen.throughput_seq_s if full.chosen else None
        rows.append(row)
    return rows


def _ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> str:
    if numerator is None:
        return "-"
    if not denominator:
        return "inf"  # the baseline cannot meet the bound at all
    return f"{numerator / denominator:.{digits}f}x"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "task", "bound", "L_B (s)", "chosen schedule", "seq/s", "p99 lat (s)", "static seq/s",
        "vs static", "vs continuous", "B&B evals", "B&B s", "exh. evals", "exh. s",
        "evals saved", "B&B / exh. seq/s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        exhaustive = "exhaustive_evaluations" in row
        cells = [
            row["task"],
            row["bound"],
            _num(row["latency_bound_s"], 3),
            row["chosen"] or "(nothing meets the bound)",
            _num(row["throughput_seq_s"]),
            _num(row["latency_s"], 3),
            _num(row["static_seq_s"]),
            _ratio(row["throughput_seq_s"], row["static_seq_s"]),
            _ratio(row["throughput_seq_s"], row["continuous_seq_s"]),
            str(row["bnb_evaluations"]),
            _num(row["bnb_wall_s"]),
            str(row["exhaustive_evaluations"]) if exhaustive else "-",
            _num(row.get("exhaustive_wall_s")),
            _ratio(row.get("exhaustive_evaluations"), row["bnb_evaluations"])
            if exhaustive
            else "-",
            _ratio(row["throughput_seq_s"], row.get("exhaustive_seq_s"), 3) if exhaustive else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Measured quick-grid profiles extrapolate past their grid and warn each time: count them.
    logging.basicConfig(level=logging.ERROR)
    try:
        loaded = load_cost_model(args.profile)
        cost_model, profile_memory, name = loaded.model, loaded.device_memory_bytes, loaded.name
        if args.gpu_memory_gb is None and profile_memory is None:
            raise ValueError("the profile does not record the device memory: give --gpu-memory-gb")
        memory_bytes = int(args.gpu_memory_gb * GIB) if args.gpu_memory_gb else profile_memory
        factors = [float(f) for f in args.factors.split(",")]
        rows = []
        for task_id in args.tasks.split(","):
            base = PlanProblem(
                cost_model,
                WorkloadDistribution.from_task(task_id),
                math.inf,
                args.gpus,
                int(memory_bytes),
            )
            rows.extend(task_rows(base, factors, not args.no_exhaustive))
    except ValueError as error:
        sys.stderr.write(f"plan_table: error: {error}\n")
        return 2
    shape = cost_model.shape
    sys.stdout.write(
        f"profile {name} ({shape.model_name}), {args.gpus} devices x "
        f"{memory_bytes / GIB:.1f} GiB; L_min: lowest p99 latency of any schedule\n\n"
    )
    sys.stdout.write(format_table(rows))
    extrapolated = getattr(cost_model, "num_extrapolated_queries", None)
    if extrapolated:
        sys.stdout.write(
            f"\n{extrapolated} cost queries fell outside the profile's measured grid and were "
            "extrapolated linearly\n"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
