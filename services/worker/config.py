"""Configuration of the worker service and its engine (one dataclass each, built in main())."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from exegpt.dtypes import DEFAULT_DTYPE
from exegpt.security import SecurityConfig
from exegpt.topology import Topology


class BatchingMode(enum.StrEnum):
    # Iteration-level batching (Orca/vLLM): new requests join the running batch, finished leave.
    CONTINUOUS = "continuous"
    # A batch runs until all its sequences finish before the next is admitted (FasterTransformer).
    STATIC = "static"


@dataclass(frozen=True)
class EngineConfig:
    batching: BatchingMode = BatchingMode.CONTINUOUS
    max_batch_size: int = 32
    # Waiting requests beyond this are refused (RESOURCE_EXHAUSTED), so memory stays bounded.
    max_queue_size: int = 512
    kv_capacity_bytes: int = 256 * 2**20
    kv_block_size_tokens: int = 16
    # The running batch is split into this many groups that step independently, so that a
    # pipeline of N stages can hold N groups at once (1: one batch, in process).
    num_micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        if self.num_micro_batches < 1:
            raise ValueError("num_micro_batches must be >= 1")
        if self.kv_capacity_bytes <= 0 or self.kv_block_size_tokens < 1:
            raise ValueError("kv_capacity_bytes and kv_block_size_tokens must be positive")


@dataclass(frozen=True)
class WorkerConfig:
    model: str = "exegpt-tiny-t5"
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    # float32, bfloat16, float16, or auto (resolved once at start for the device that runs
    # the model: exegpt/dtypes.py); weights, activations and KV cache all use it.
    dtype: str = DEFAULT_DTYPE
    torch_threads: int | None = None
    max_message_bytes: int = 4 * 2**20
    engine: EngineConfig = field(default_factory=EngineConfig)
    # gRPC addresses of the stage processes that run the model (None: run it in process).
    stage_addresses: tuple[tuple[str, ...], ...] | None = None
    topology: Topology = field(default_factory=Topology)
    # Written with "host:port" once the server is bound (lets a launcher use port 0).
    ready_file: str | None = None
    grace_period_s: float = 5.0
    # API key and TLS of this worker's server and of its calls to its stages.
    security: SecurityConfig = field(default_factory=SecurityConfig)
