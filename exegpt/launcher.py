"""The processes of a local deployment: the router, N worker replicas and their stage
processes, started, supervised and stopped together (`exegpt up` is its command line, in
exegpt/commands/up.py).

Workers start on free ports and publish their address through a ready file; the router is
started with those addresses. `ready` is printed once every process reports healthy, and
Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace period).

The launcher supervises its children: one that dies is restarted with exponential backoff
while the others keep serving, on the ports it had (the router keeps its list of worker
addresses, and clients keep the router's). Only a crash loop (more than `max_restarts`
exits of one child within `window_s`) stops the deployment, and the log says so. The
shared-memory rings of a child that died without unlinking them are removed when it is seen.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from exegpt.chunk_budgets import check_chunk_budgets
from exegpt.dtypes import DEFAULT_DTYPE
from exegpt.models.hub_cache import local_model_directory
from exegpt.security import SecurityConfig
from exegpt.serving import supervisor_environment
from exegpt.shm_sweep import sweep_dead_segments
from exegpt.topology import (
    Topology,
    format_stage_addresses,
)

logger = logging.getLogger("exegpt.launcher")


class LaunchError(RuntimeError):
    """A service failed to start; the message carries the end of its log."""


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    # More than max_restarts exits of one child within window_s is a crash loop.
    max_restarts: int = 5
    window_s: float = 60.0
    # A child that stayed up this long is restarted after the initial backoff again.
    stable_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.initial_backoff_s < 0:
            raise ValueError("--max-restarts must be >= 0 and --restart-window-s positive")


@dataclass(frozen=True)
class DeploymentConfig:
    model: str = "exegpt-tiny-t5"
    num_replicas: int = 1
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    batching: str | None = None  # None: the plan's kind with --schedule, else continuous
    # A plan from `exegpt plan --json`: its schedule runs on every replica, at its placement.
    schedule_file: Path | None = None
    # HOST:PORT of a scheduler service every worker watches and reports to (--scheduler).
    scheduler: str | None = None
    max_batch_size: int = 32
    engine_policy: str | None = None  # None: the worker's default (fcfs)
    max_tokens_per_step: int | None = None  # chunked prefill budget; None: off
    long_output_tokens_per_step: int | None = None  # its budget for long outputs; None: off
    long_output_min_tokens: int | None = None  # the output length that takes it; None: default
    kv_cache_mb: float = 256.0
    # Passed to every worker, which resolves `auto` and tells its stages the result.
    dtype: str = DEFAULT_DTYPE
    torch_threads: int | None = None
    startup_timeout_s: float = 120.0
    # Child logs go here; None lets children write to this process's stderr.
    log_dir: Path | None = None
    extra_worker_args: tuple[str, ...] = field(default_factory=tuple)
    extra_router_args: tuple[str, ...] = field(default_factory=tuple)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    topology: Topology = field(default_factory=Topology)
    # Workers and stages bind here; only the router (gateway) binds `host`.
    worker_host: str = "127.0.0.1"
    # Handed to every child through EXEGPT_* environment variables, never argv.
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError("--replicas must be >= 1")
        check_chunk_budgets(
            self.max_tokens_per_step, self.long_output_tokens_per_step, self.long_output_min_tokens
        )


@dataclass
class _Child:
    name: str
    module: str
    args: list[str]
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path | None
    started_s: float = field(default_factory=time.monotonic)
    ready: bool = False
    exits_s: deque[float] = field(default_factory=deque)
    backoff_s: float = 0.0
    restart_at_s: float | None = None

    def log_tail(self, num_lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(log on the launcher's stderr)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])


class Deployment:
    """The local processes of one deployment; use as a context manager."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self._state_dir = Path(tempfile.mkdtemp(prefix="exegpt-"))
        self._children: list[_Child] = []
        self.worker_addresses: list[str] = []
        self.grpc_address = ""
        self.http_url = ""

    def start(self) -> None:
        try:
            stages = [self._start_stages(index) for index in range(self.config.num_replicas)]
            workers = [
                self._spawn_worker(index, stages[index])
                for index in range(self.config.num_replicas)
            ]
            self.worker_addresses = [self._wait_ready(child) for child in workers]
            for child, address in zip(workers, self.worker_addresses, strict=True):
                # A restarted worker must come back where the router looks for it.
                _set_flag(child.args, "--port", address.rsplit(":", 1)[1])
            router = self._spawn_router()
            self.grpc_address, self.http_url = self._wait_ready(router).split()
            _set_flag(router.args, "--grpc-port", self.grpc_address.rsplit(":", 1)[1])
            _set_flag(router.args, "--http-port", self.http_url.rsplit(":", 1)[1])
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, module: str, args: list[str]) -> _Child:
        ready_file = self._state_dir / f"{name}.ready"
        log_path = self.config.log_dir / f"{name}.log" if self.config.log_dir else None
        process = self._popen(module, args, ready_file, log_path, self.config.security)
        child = _Child(name, module, args, process, ready_file, log_path)
        self._children.append(child)
        return child

    @staticmethod
    def _popen(
        module: str,
        args: list[str],
        ready_file: Path,
        log_path: Path | None,
        security: SecurityConfig,
    ) -> subprocess.Popen[bytes]:
        ready_file.unlink(missing_ok=True)
        # Appended to, so a restarted child's log follows the one that died.
        output = open(log_path, "ab") if log_path else None  # noqa: SIM115 (owned by the child)
        command = [sys.executable, "-m", module, *args, "--ready-file", str(ready_file)]
        env = {**os.environ, **security.environment(), **supervisor_environment()}
        process = subprocess.Popen(command, stdout=output, stderr=output, env=env)
        if output is not None:
            output.close()
        return process

    def _start_stages(self, replica: int) -> str | None:
        """Start a pipelined replica's stage processes; their addresses for the worker."""
        topology = self.config.topology
        if not topology.is_pipelined:
            return None
        layout = topology.ranks_per_stage()
        num_devices = self.config.num_replicas * sum(layout)
        threads = topology.threads_per_device or max(1, (os.cpu_count() or 1) // num_devices)
        model_roots = []
        if (directory := local_model_directory(self.config.model)) is not None:  # or a Hub id
            model_roots = ["--model-root", str(directory.resolve().parent)]
        first_device = replica * sum(layout)
        children = [
            [
                self._spawn(
                    f"stage-{replica}-{stage}-{rank}",
                    "services.worker.stage",
                    [
                        "--host",
                        self.config.worker_host,
                        "--port",
                        "0",
                        "--torch-threads",
                        str(threads),
                        "--device",
                        topology.device_of(first_device + sum(layout[:stage]) + rank),
                        *model_roots,
                    ],
                )  # fmt: skip
                for rank in range(num_ranks)
            ]
            for stage, num_ranks in enumerate(layout)
        ]
        grouped = []
        for ranks in children:
            addresses = [self._wait_ready(child) for child in ranks]
            for child, address in zip(ranks, addresses, strict=True):
                _set_flag(child.args, "--port", address.rsplit(":", 1)[1])  # restart in place
            grouped.append(addresses)
        return format_stage_addresses(grouped)

    def _spawn_worker(self, index: int, stages: str | None = None) -> _Child:
        return self._spawn(f"worker-{index}", "services.worker", self.worker_args(index, stages))

    def worker_args(self, index: int, stages: str | None = None) -> list[str]:
        """Replica `index`'s worker flags. An in-process replica computes itself: it is a
        device (--threads-per-device), the `index`-th one (cuda: cuda:index; cpu stays cpu);
        a pipelined one's stages hold its devices, `stages` their addresses."""
        threads = (
            self.config.torch_threads
            or self.config.topology.threads_per_device
            or max(1, (os.cpu_count() or 1) // self.config.num_replicas)
        )
        if stages is not None:
            threads = self.config.torch_threads or 1  # the stages compute; the engine plans
        topology_args = ["--device", self.config.topology.device_of(index)]
        if stages is not None:
            topology_args = ["--stages", stages, *self.config.topology.worker_args()]
        args = [
            "--model", self.config.model,
            "--host", self.config.worker_host,
            "--port", "0",
            *(["--batching", self.config.batching] if self.config.batching else []),
            *(["--schedule", str(self.config.schedule_file)] if self.config.schedule_file else []),
            *(["--scheduler", self.config.scheduler] if self.config.scheduler else []),
            "--max-batch-size", str(self.config.max_batch_size),
            *(["--engine-policy", self.config.engine_policy] if self.config.engine_policy else []),
            *self._chunk_budget_args(),
            "--kv-cache-mb", str(self.config.kv_cache_mb),
            "--dtype", self.config.dtype,
            "--torch-threads", str(threads),
            *topology_args,
            *self.config.extra_worker_args,
        ]  # fmt: skip
        return args

    def _chunk_budget_args(self) -> list[str]:
        """The worker flags of the chunk budgets given (0 included: the worker refuses it)."""
        flags = {
            "--max-tokens-per-step": self.config.max_tokens_per_step,
            "--long-output-tokens-per-step": self.config.long_output_tokens_per_step,
            "--long-output-min-tokens": self.config.long_output_min_tokens,
        }
        given = [(flag, value) for flag, value in flags.items() if value is not None]
        return [arg for flag, value in given for arg in (flag, str(value))]

    def _spawn_router(self) -> _Child:
        args = [
            "--replicas", ",".join(self.worker_addresses),
            "--host", self.config.host,
            "--grpc-port", str(self.config.grpc_port),
            "--http-port", str(self.config.http_port),
            *self.config.extra_router_args,
        ]  # fmt: skip
        return self._spawn("router", "services.router", args)

    def _wait_ready(self, child: _Child) -> str:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if child.ready_file.exists():
                child.ready = True
                return child.ready_file.read_text().strip()
            if child.process.poll() is not None:
                raise LaunchError(
                    f"{child.name} exited with code {child.process.returncode}:\n{child.log_tail()}"
                )
            time.sleep(0.05)
        raise LaunchError(f"{child.name} did not become ready in {self.config.startup_timeout_s}s")

    def supervise(self) -> str | None:
        """Restart dead children (after their backoff); the reason to stop on a crash loop."""
        now = time.monotonic()
        for child in self._children:
            if child.process.poll() is None:
                if not child.ready and child.ready_file.exists():
                    child.ready = True
                    logger.info("%s restarted and ready again", child.name)
                continue
            if child.restart_at_s is None:
                sweep_dead_segments(pid=child.process.pid)  # a killed child's rings
                if reason := self._schedule_restart(child, now):
                    return reason
            elif now >= child.restart_at_s:
                child.restart_at_s = None
                child.ready = False
                child.started_s = now
                child.process = self._popen(
                    child.module, child.args, child.ready_file, child.log_path,
                    self.config.security,
                )  # fmt: skip
        return None

    def _schedule_restart(self, child: _Child, now: float) -> str | None:
        policy = self.config.restart
        code = child.process.returncode
        child.exits_s.append(now)
        while child.exits_s and now - child.exits_s[0] > policy.window_s:
            child.exits_s.popleft()
        if len(child.exits_s) > policy.max_restarts:
            return (
                f"{child.name} exited {len(child.exits_s)} times within {policy.window_s:.0f}s "
                f"(last exit code {code}): a crash loop; stopping the deployment\n"
                f"{child.log_tail()}"
            )
        if now - child.started_s >= policy.stable_after_s or child.backoff_s == 0:
            child.backoff_s = policy.initial_backoff_s
        delay = child.backoff_s
        child.backoff_s = min(policy.max_backoff_s, max(delay, 0.01) * 2)
        child.restart_at_s = now + delay
        logger.warning(
            "%s exited with code %s; restarting it in %.1fs (exit %d of %d allowed within %.0fs)",
            child.name, code, delay, len(child.exits_s), policy.max_restarts, policy.window_s,
        )  # fmt: skip
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child, wait, then SIGKILL what is left; no orphans."""
        for child in self._children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self._children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", child.name, grace_s)
                child.process.kill()
                child.process.wait()
            sweep_dead_segments(pid=child.process.pid)
        self._children.clear()

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _set_flag(args: list[str], flag: str, value: str) -> None:
    args[args.index(flag) + 1] = value
