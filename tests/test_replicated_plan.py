"""`exegpt up --schedule PLAN.json` for a plan of R = 2 data-parallel replicas: the launcher
starts two workers, each running the plan's schedule at the plan's (one-device) placement
behind the router, and every request gets the single-process engine's greedy tokens."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from exegpt.models.loader import load_model
from exegpt.placement import Placement
from exegpt.schedule import Schedule, ScheduleKind
from exegpt.sdk import Client
from exegpt.v1 import worker_pb2, worker_pb2_grpc
from services.worker.config import EngineConfig
from services.worker.server import build_engine
from tests.worker.test_engine import run_all_queued

MODEL = "exegpt-tiny-t5"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18], [19, 20, 21], [22, 23]]
NUM_TOKENS = 5


def _single_process_tokens() -> list[list[int]]:
    return run_all_queued(build_engine(load_model(MODEL), EngineConfig()), PROMPTS, NUM_TOKENS)


def _write_plan(path: Path) -> Schedule:
    config = load_model(MODEL).config
    schedule = Schedule(ScheduleKind.RRA, 2, 4, num_decode_iterations=3, num_replicas=2)
    plan = {
        "schedule": schedule.to_dict(),
        "placement": Placement.even(config, 1).to_dict(),  # one replica's: one device
        "workload": "task:S",
        "mean_input_tokens": 4.0,
        "mean_output_tokens": 5.0,
        "predicted": {"throughput_seq_s": 10.0, "throughput_tokens_s": 50.0, "latency_s": 2.0},
    }
    path.write_text(json.dumps(plan))
    return schedule


def test_a_plan_of_two_replicas_deploys_two_and_serves_the_same_greedy_tokens(
    tmp_path: Path,
) -> None:
    expected = _single_process_tokens()
    plan_path = tmp_path / "plan.json"
    schedule = _write_plan(plan_path)
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--schedule", str(plan_path),
        "--torch-threads", "1", "--http-port", "0", "--grpc-port", "0",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        assert "ready" in line, line
        http_url = re.search(r"http=(\S+)", line).group(1)  # type: ignore[union-attr]
        grpc_address = re.search(r"grpc=(\S+)", line).group(1)  # type: ignore[union-attr]
        workers = re.search(r"replicas=(\S+)", line).group(1).split(",")  # type: ignore[union-attr]
        assert len(workers) == 2
        assert not list((tmp_path / "logs").glob("stage-*.log"))  # each replica in process
        for worker in workers:
            with grpc.insecure_channel(worker) as channel:
                stats = worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest())
            assert stats.batching == "rra"
        with Client(grpc_address) as client:
            got = [
                client.generate(p, max_tokens=NUM_TOKENS, ignore_eos=True).token_ids
                for p in PROMPTS
            ]
        assert got == expected
        body = httpx.get(f"{http_url}/schedule", timeout=30).json()
        replicas = body["data"]
        assert sorted(r["address"] for r in replicas) == sorted(workers)
        for replica in replicas:
            assert replica["schedule"]["num_replicas"] == schedule.num_replicas == 2
            # Each replica expects its share of the plan's throughput, and its latency.
            assert replica["prediction"]["throughput_seq_s"] == pytest.approx(5.0)
            assert replica["prediction"]["latency_s"] == pytest.approx(2.0)
            assert replica["measured"]["num_finished"] >= 1  # the router used both
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
