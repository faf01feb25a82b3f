"""The profile's `serving` section: the serving path's host work, measured on a real deployment.

The layer timings price the forwards alone. Here the profiled model is served for real, as
`exegpt up` serves it (router, HTTP gateway, one worker replica, continuous batching), and
`exegpt bench` drives it at saturation with the paper's task S (lengths scaled down so a run
lasts seconds) at two batch sizes. The worker's engine clock (GetStats step_totals) splits
its busy time into time inside forwards and host work, by step kind; the host work of each
run's prefill and decode steps is fitted to

    host_s = steps x step_s + rows x token_s + requests x request_s

(exegpt/serving_overhead.py), the terms the simulator adds to every step it models. The
router and the bench client run on the same machine, as they do when `exegpt bench`
measures a deployment, so their share of the cores shows in the host work.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from exegpt.launcher import Deployment, DeploymentConfig
from exegpt.profile.format import ServingData
from exegpt.serving_overhead import StepSample, fit_overhead
from exegpt.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

WORKLOAD = "task:S"
LENGTH_SCALE = 0.25
BATCH_SIZES = (4, 16)
REQUESTS_PER_SLOT = 8  # a burst of 8 x the batch: the batch stays full most of the run
BENCH_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ServingSettings:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    workload: str = WORKLOAD
    length_scale: float = LENGTH_SCALE

    @property
    def method(self) -> str:
        sizes = ",".join(map(str, self.batch_sizes))
        return (
            f"exegpt up (continuous, max batch {sizes}) + exegpt bench --workload "
            f"{self.workload} --length-scale {self.length_scale:g} --rate inf"
        )


def measure_serving(
    settings: ServingSettings, on_run: Callable[[int], None] | None = None
) -> ServingData:
    """Serve the model at each batch size, then fit the host work to the engine's totals.
    Raises RuntimeError when a deployment or a bench run fails."""
    samples: list[StepSample] = []
    forward_s = host_s = 0.0
    with tempfile.TemporaryDirectory(prefix="exegpt-serving-") as scratch:
        for batch_size in settings.batch_sizes:
            totals = _serve(settings, batch_size, Path(scratch))
            for kind, (steps, rows, run_forward_s, run_host_s) in totals.items():
                requests = rows if kind == "prefill" else 0
                samples.append(StepSample(steps, rows, requests, run_host_s))
                forward_s += run_forward_s
                host_s += run_host_s
            if on_run is not None:
                on_run(batch_size)
    overhead = fit_overhead(samples)
    return ServingData(
        step_s=overhead.step_s,
        token_s=overhead.token_s,
        request_s=overhead.request_s,
        num_steps=sum(s.num_steps for s in samples),
        busy_fraction=forward_s / (forward_s + host_s) if forward_s + host_s > 0 else 0.0,
        method=settings.method,
    )


Totals = dict[str, tuple[int, int, float, float]]  # kind -> steps, rows, forward_s, host_s


def _serve(settings: ServingSettings, batch_size: int, scratch: Path) -> Totals:
    """One deployment at `batch_size`, one saturating burst; the engine's totals of it."""
    config = DeploymentConfig(
        model=settings.model,
        http_port=0,
        grpc_port=0,
        batching="continuous",
        max_batch_size=batch_size,
        dtype=settings.dtype,
        log_dir=scratch,
        extra_worker_args=("--device", settings.device),
    )
    try:
        with Deployment(config) as deployment:
            before = _step_totals(deployment.worker_addresses[0])
            _bench(deployment.http_url, settings, batch_size, scratch)
            after = _step_totals(deployment.worker_addresses[0])
    except (OSError, subprocess.SubprocessError, grpc.RpcError) as exc:
        raise RuntimeError(f"serving measurement at batch {batch_size} failed: {exc}") from exc
    return {kind: _minus(after[kind], before.get(kind)) for kind in after}


def _minus(
    after: tuple[int, int, float, float], before: tuple[int, int, float, float] | None
) -> tuple[int, int, float, float]:
    if before is None:
        return after
    return (
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
        after[3] - before[3],
    )


def _step_totals(address: str) -> Totals:
    with grpc.insecure_channel(address) as channel:
        stats = worker_pb2_grpc.WorkerStub(channel).GetStats(
            worker_pb2.GetStatsRequest(), timeout=30
        )
    return {t.kind: (t.num_steps, t.num_rows, t.forward_s, t.host_s) for t in stats.step_totals}


def _bench(url: str, settings: ServingSettings, batch_size: int, scratch: Path) -> None:
    num_requests = max(64, REQUESTS_PER_SLOT * batch_size)
    command = [
        sys.executable, "-m", "exegpt.bench", "--url", url,
        "--workload", settings.workload, "--length-scale", str(settings.length_scale),
        "--num-requests", str(num_requests), "--rate", "inf",
        "--json", str(scratch / f"bench-{batch_size}.json"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise subprocess.SubprocessError(f"exegpt bench exited {done.returncode}: {done.stderr}")
