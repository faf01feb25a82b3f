"""`exegpt up --plan`: profile (cached), plan, print the choice, deploy it as real processes.

The profile grid is tiny so the test profiles for real in seconds; the deployment must come
up running the kind the plan chose, on the plan's stage processes, and serve requests.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np

from exegpt.commands import autoplan
from exegpt.profile.format import read_profile
from exegpt.v1 import worker_pb2, worker_pb2_grpc

TINY_GRID = {
    "batch_sizes": [1, 8],
    "seq_lens_tokens": [16, 64],
    "kv_lens_tokens": [1, 64],
    "num_tokens": [1, 64, 512],
    "message_bytes": [1024, 65536],
    "num_warmup": 0,
    "num_repeats": 1,
    "num_rounds": 1,
    "min_sample_s": 0.001,
    "max_measure_s": 0.05,
}


def _read_until_ready(launcher: subprocess.Popen[str]) -> list[str]:
    lines = []
    for line in launcher.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if "ready" in line:
            return lines
    raise AssertionError("exegpt up exited before ready:\n" + "".join(lines))


def test_up_plan_profiles_plans_and_serves_the_planned_kind(tmp_path: Path) -> None:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(TINY_GRID))
    profile_dir = tmp_path / "profiles"
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--plan", "--workload", "task:S",
        "--length-scale", "0.1", "--latency-bound", "inf", "--devices", "2",
        "--threads-per-device", "1", "--profile-dir", str(profile_dir),
        "--profile-grid", str(grid), "--http-port", "0", "--grpc-port", "0",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        lines = _read_until_ready(launcher)
        output = "".join(lines)
        assert "profile: measuring" in output
        kind = re.search(r"chosen: (\S+)", output).group(1)
        plan_path = Path(re.search(r"plan file: (\S+)", output).group(1))
        plan = json.loads(plan_path.read_text())
        assert plan["schedule"]["kind"] == kind == plan["chosen_kind"]
        # The honest choice: no kind the search or the baselines found predicts more.
        best = max(p["throughput_seq_s"] for p in plan["best_by_kind"].values())
        assert plan["predicted"]["throughput_seq_s"] == best
        http_url = re.search(r"http=(\S+)", lines[-1]).group(1)
        workers = re.search(r"replicas=(\S+)", lines[-1]).group(1).split(",")
        # The plan's R data-parallel replicas, each at the plan's placement on 2 / R devices.
        num_replicas = plan["schedule"]["num_replicas"]
        assert len(workers) == num_replicas
        for worker in workers:
            with grpc.insecure_channel(worker) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                assert stub.GetStats(worker_pb2.GetStatsRequest()).batching == kind
        num_stages = len(plan["placement"]["stages"])
        assert num_stages * num_replicas == 2
        stage_logs = sorted((tmp_path / "logs").glob("stage-*.log"))
        assert len(stage_logs) == (2 if num_stages > 1 else 0)  # in process on one device
        for index in range(3):
            body = httpx.post(
                f"{http_url}/v1/completions",
                json={"prompt": [3, 4, 5 + index], "max_tokens": 4, "ignore_eos": True},
                timeout=120,
            ).json()
            assert body["usage"]["completion_tokens"] == 4
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # A second run finds the profile in the cache and does not measure again.
    request = autoplan.PlanRequest(
        workload="task:S", threads=1, profile_dir=profile_dir, profile_grid=str(grid)
    )
    cached = autoplan.profile_path(request)
    assert cached.is_file()
    # It was measured with the serving path's host work, which the plan priced.
    assert read_profile(cached).serving is not None
    before = cached.stat().st_mtime_ns
    assert autoplan.ensure_profile(request, open("/dev/null", "w")) == cached
    assert cached.stat().st_mtime_ns == before


def test_scaled_task_matches_what_bench_sends() -> None:
    from exegpt.bench.workload_plan import PlanOptions, build_plan, parse_workload

    scaled = autoplan.scaled_task("S", 0.25)
    requests = build_plan(
        parse_workload("task:S"), PlanOptions(num_requests=4000, length_scale=0.25)
    )
    outputs = np.array([r.output_tokens for r in requests])
    assert abs(outputs.mean() - scaled.mean_output_tokens) < 0.05 * scaled.mean_output_tokens
    assert scaled.max_output_tokens == 20 and scaled.output_p99_tokens == 16


def test_a_cached_auto_profile_measured_on_another_grid_is_measured_again(
    measured_tiny_profile: Path, tmp_path: Path
) -> None:
    import argparse
    from dataclasses import asdict

    from exegpt.profile.format import ServingData
    from services.profiler.cli import add_arguments, grid_from_args

    # The grid the profiler records when `exegpt up --plan` profiles on the auto grid.
    request = autoplan.PlanRequest(workload="task:S", threads=1, profile_dir=tmp_path)
    command = autoplan.profile_command(request, tmp_path / "out.json")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    _, auto_grid = grid_from_args(parser.parse_args(command[command.index("profile") + 1 :]))
    # A profile that carries the serving path's host work and serving's Linear kernel, on
    # the auto grid's sizes: the cache uses it.
    data = read_profile(measured_tiny_profile)
    serving = ServingData(
        step_s=1e-3, token_s=1e-4, request_s=5e-4, num_steps=100, busy_fraction=0.8, method="test"
    )
    on_auto = data.model_copy(update={"grid": asdict(auto_grid), "serving": serving})
    path = tmp_path / "cached.json"
    path.write_text(on_auto.model_dump_json())
    assert autoplan._loads(path, request)
    # The same profile measured on another grid (an older auto grid) is not used.
    path.write_text(on_auto.model_copy(update={"grid": data.grid}).model_dump_json())
    assert not autoplan._loads(path, request)
    # A model of a short context has the lengths past it dropped from the grid it records
    # (ProfileGrid.for_context): that is still the auto grid.
    short_model = data.model.model_copy(update={"max_context_tokens": 100})
    short_grid = asdict(auto_grid.for_context(100))
    assert list(short_grid["kv_lens_tokens"]) == [1, 8, 64]
    short = on_auto.model_copy(update={"grid": short_grid, "model": short_model})
    path.write_text(short.model_dump_json())
    assert autoplan._loads(path, request)
