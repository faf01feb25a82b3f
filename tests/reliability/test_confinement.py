"""The scheduler reads files a client names only under its configured directories."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from exegpt.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.reliability.procs import services

SECRET = "SECRET-LINE-do-not-echo"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ANALYTIC = "analytic:a40:opt-13b"


def _plan(stub: scheduler_pb2_grpc.SchedulerStub, **fields: object) -> grpc.RpcError | None:
    request = scheduler_pb2.PlanRequest(num_devices=1, no_latency_bound=True, **fields)
    try:
        stub.Plan(request, timeout=30)
    except grpc.RpcError as exc:
        return exc
    return None


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "traces").mkdir()
    (tmp_path / "secret.csv").write_text(f"{HEADER}{SECRET},1,1\n")
    (tmp_path / "traces" / "bad.csv").write_text(f"{HEADER}{SECRET},1,1\n")
    rows = "".join(f"2023-11-16 18:15:{i:02d}.0000000,{10 + i},{5 + i}\n" for i in range(20))
    (tmp_path / "traces" / "good.csv").write_text(HEADER + rows)
    (tmp_path / "profiles" / "huge.json").write_bytes(b" " * (2 * 2**20))
    os.mkfifo(tmp_path / "profiles" / "fifo.json")
    (tmp_path / "profiles" / "link.json").symlink_to("/dev/zero")
    return tmp_path


def test_request_paths_are_confined_checked_and_never_echoed(files: Path) -> None:
    with services(files) as group:
        args = ["--port", "0", "--max-file-mb", "1"]
        args += ["--profile-dir", str(files / "profiles"), "--trace-dir", str(files / "traces")]
        scheduler = group.start("scheduler", "services.scheduler", args)
        with grpc.insecure_channel(scheduler.ready) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            refusals = {
                "outside the allowed directories": [
                    {"profile": ANALYTIC, "workload": f"trace:{files / 'secret.csv'}"},
                    {"profile": ANALYTIC, "workload": "trace:../secret.csv"},
                    {"profile": "/dev/zero"},
                    {"profile": "link.json"},  # a symlink out of the directory
                ],
                "not a regular file": [{"profile": "fifo.json"}],
                "over the limit": [{"profile": "huge.json"}],
                "malformed": [{"profile": ANALYTIC, "workload": "trace:bad.csv"}],
            }
            for problem, requests in refusals.items():
                for fields in requests:
                    error = _plan(stub, **fields)
                    assert error is not None, fields
                    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
                    assert problem in error.details(), (fields, error.details())
                    assert SECRET not in error.details()
            assert _plan(stub, profile=ANALYTIC, workload="trace:good.csv") is None
