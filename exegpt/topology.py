"""A replica's process topology as configuration: how many pipeline stages, the TP degree,
or a placement file, and where each stage rank listens. Shared by `exegpt up` (which starts
the stage processes) and the worker (which loads them)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from exegpt.models.config import ModelConfig
from exegpt.placement import Placement

MAX_PLACEMENT_BYTES = 1 << 20


@dataclass(frozen=True)
class Topology:
    pipeline_stages: int = 1
    tensor_parallel: int = 1
    placement_file: Path | None = None
    # Intra-op threads of each stage process (a "device" on a CPU machine).
    threads_per_device: int | None = None
    device: str = "cpu"
    # A planned schedule's placement (exegpt plan --json), when no flag names another.
    planned: Placement | None = None

    def __post_init__(self) -> None:
        if self.pipeline_stages < 1 or self.tensor_parallel < 1:
            raise ValueError("--pipeline-stages and --tensor-parallel must be >= 1")
        if self.placement_file is not None and (self.pipeline_stages, self.tensor_parallel) != (
            1,
            1,
        ):
            raise ValueError("give --placement or --pipeline-stages/--tensor-parallel, not both")

    @property
    def is_pipelined(self) -> bool:
        """Stage processes run the model (else the worker runs it in process)."""
        if self.planned is not None and self._default_layout():
            return self.planned.num_processes > 1
        return self.placement_file is not None or self.pipeline_stages * self.tensor_parallel > 1

    def _default_layout(self) -> bool:
        return self.placement_file is None and self.pipeline_stages * self.tensor_parallel == 1

    def device_of(self, index: int) -> str:
        """The device of a replica's `index`-th process: `cuda` spreads them over the GPUs
        (cuda:0, cuda:1, ...); anything else (cpu, or cuda:N) is used as given."""
        return f"cuda:{index}" if self.device == "cuda" else self.device

    def read_placement_text(self) -> str:
        assert self.placement_file is not None
        path = self.placement_file
        if not path.is_file() or path.stat().st_size > MAX_PLACEMENT_BYTES:
            raise ValueError(f"placement {path} is not a regular file of at most 1 MiB")
        return path.read_text()

    def ranks_per_stage(self) -> list[int]:
        """TP ranks of each stage, known without the model (the launcher starts them)."""
        if self.planned is not None and self._default_layout():
            return [stage.tp_degree for stage in self.planned.stages]
        if self.placement_file is None:
            return [self.tensor_parallel] * self.pipeline_stages
        return [stage.tp_degree for stage in Placement.from_json(self.read_placement_text()).stages]

    def placement(self, config: ModelConfig) -> Placement:
        if self.planned is not None and self._default_layout():
            self.planned.check(config)
            return self.planned
        if self.placement_file is None:
            return Placement.even(config, self.pipeline_stages, self.tensor_parallel)
        placement = Placement.from_json(self.read_placement_text())
        placement.check(config)
        return placement

    def worker_args(self) -> list[str]:
        """Flags that give a worker this topology (a planned one travels with --schedule)."""
        if self.planned is not None and self._default_layout():
            return []
        if self.placement_file is not None:
            return ["--placement", str(self.placement_file)]
        return [
            "--pipeline-stages", str(self.pipeline_stages),
            "--tensor-parallel", str(self.tensor_parallel),
        ]  # fmt: skip


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-stages", type=int, default=1, help="stages per replica (even layer split)"
    )
    parser.add_argument(
        "--tensor-parallel", type=int, default=1, help="TP ranks per stage (Megatron sharding)"
    )
    parser.add_argument(
        "--placement",
        type=Path,
        default=None,
        help="JSON placement: each stage's encoder/decoder layer range, TP degree, role",
    )


def topology_from_args(args: argparse.Namespace, planned: Placement | None = None) -> Topology:
    return Topology(
        pipeline_stages=args.pipeline_stages,
        tensor_parallel=args.tensor_parallel,
        placement_file=args.placement,
        threads_per_device=getattr(args, "threads_per_device", None),
        device=getattr(args, "device", "cpu"),
        planned=planned,
    )


def format_stage_addresses(grouped: list[list[str]] | tuple[tuple[str, ...], ...]) -> str:
    """'h:p+h:p,h:p': stages separated by commas, the TP ranks of a stage by plus signs."""
    return ",".join("+".join(ranks) for ranks in grouped)


def parse_stage_addresses(text: str) -> tuple[tuple[str, ...], ...]:
    stages = tuple(tuple(r.strip() for r in part.split("+")) for part in text.split(","))
    for ranks in stages:
        for address in ranks:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--stages: {address!r} is not host:port")
    return stages
