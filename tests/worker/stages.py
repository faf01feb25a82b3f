"""Real stage processes for the pipeline tests: started once, re-loaded per placement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 120.0


@dataclass
class StageProcess:
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path
    address: str = ""

    def wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.address = self.ready_file.read_text().strip()
                return self.address
            if self.process.poll() is not None:
                raise RuntimeError(f"stage exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("stage did not become ready")


@dataclass
class StagePool:
    directory: Path
    model_root: Path
    stages: list[StageProcess] = field(default_factory=list)

    def start(self, count: int, port: int = 0) -> list[StageProcess]:
        started = []
        for _ in range(count):
            index = len(self.stages)
            ready = self.directory / f"stage-{index}.ready"
            ready.unlink(missing_ok=True)
            log = self.directory / f"stage-{index}.log"
            command = [
                sys.executable, "-m", "services.worker.stage",
                "--port", str(port), "--ready-file", str(ready), "--torch-threads", "1",
                "--model-root", str(self.model_root),
            ]  # fmt: skip
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(log, "wb") as output:
                process = subprocess.Popen(command, stdout=output, stderr=output, env=env)
            stage = StageProcess(process, ready, log)
            self.stages.append(stage)
            started.append(stage)
        for stage in started:
            stage.wait_ready()
        return started

    def addresses(self, layout: list[int]) -> tuple[tuple[str, ...], ...]:
        """Addresses grouped as `layout` ranks per stage, from the pool's first processes."""
        grouped, next_index = [], 0
        for num_ranks in layout:
            grouped.append(
                tuple(s.address for s in self.stages[next_index : next_index + num_ranks])
            )
            next_index += num_ranks
        return tuple(grouped)

    def stop(self) -> None:
        for stage in self.stages:
            if stage.process.poll() is None:
                stage.process.terminate()
        for stage in self.stages:
            try:
                stage.process.wait(10)
            except subprocess.TimeoutExpired:
                stage.process.kill()
