"""Configuration of the worker service and its engine (one dataclass each, built in main())."""

from __future__ import annotations

from dataclasses import dataclass, field

from exegpt.chunk_budgets import DEFAULT_LONG_OUTPUT_MIN_TOKENS, check_chunk_budgets
from exegpt.dtypes import DEFAULT_DTYPE
from exegpt.models.kv_cache import DEFAULT_BLOCK_SIZE_TOKENS
from exegpt.schedule import Schedule, ScheduleKind
from exegpt.security import SecurityConfig
from exegpt.topology import Topology
from services.worker.policies.config import PolicyConfig
from services.worker.schedule_board import PlannedPrediction

# How batches form is a schedule kind (services/worker/modes/): the baselines, continuous
# (Orca/vLLM iteration-level batching) and static (FasterTransformer), or a planned ExeGPT
# schedule, rra or waa-c / waa-m, whose control variables come with it.
BATCHING_KINDS = tuple(kind.value for kind in ScheduleKind)


@dataclass(frozen=True)
class EngineConfig:
    batching: ScheduleKind = ScheduleKind.CONTINUOUS
    max_batch_size: int = 32
    # Waiting requests beyond this are refused (RESOURCE_EXHAUSTED), so memory stays bounded.
    max_queue_size: int = 512
    kv_capacity_bytes: int = 256 * 2**20
    kv_block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS
    # The running batch is split into this many groups that step independently, so that a
    # pipeline of N stages can hold N groups at once (1: one batch, in process).
    num_micro_batches: int = 1
    # rra / waa: the planned schedule's control variables (B_E, B_D, N_D, B_m).
    schedule: Schedule | None = None
    # rra: each encoding's prompt tokens stay within this fraction of B_E x this mean.
    mean_input_tokens: float | None = None
    input_band: float = 0.2
    # Who goes next and who is preempted (--engine-policy: fcfs, memory_aware, sjf).
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Chunked prefill (--max-tokens-per-step): at most this many prompt tokens a step, chunk
    # steps alternating with decode steps (services/worker/chunked.py); None: off.
    max_tokens_per_step: int | None = None
    # --long-output-tokens-per-step M: the budget is M while every decoding sequence expects
    # at least long_output_min_tokens output tokens in all (chunked.py); None: always N.
    long_output_tokens_per_step: int | None = None
    # A request of this many output tokens (G - 1 gaps) absorbs one longer step in its time
    # per output token.
    long_output_min_tokens: int = DEFAULT_LONG_OUTPUT_MIN_TOKENS

    def __post_init__(self) -> None:
        if not self.batching.is_baseline and self.schedule is None:
            raise ValueError(f"{self.batching} batching needs a schedule (exegpt plan --json)")
        if not 0 <= self.input_band < 1:
            raise ValueError("input_band must be in [0, 1)")
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        check_chunk_budgets(
            self.max_tokens_per_step, self.long_output_tokens_per_step, self.long_output_min_tokens
        )
        if self.num_micro_batches < 1:
            raise ValueError("num_micro_batches must be >= 1")
        if self.kv_capacity_bytes <= 0 or self.kv_block_size_tokens < 1:
            raise ValueError("kv_capacity_bytes and kv_block_size_tokens must be positive")


@dataclass(frozen=True)
class ScheduleLinkConfig:
    """The replica's link to the scheduler (--scheduler): it applies every schedule pushed
    over WatchSchedule and reports what it observes over ReportWorkload."""

    address: str
    report_interval_s: float = 5.0
    # Reconnecting to a scheduler that is down: the wait doubles from initial to max.
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    # Lengths plus stage times per WorkloadReport (the scheduler refuses more than its limit).
    max_report_items: int = 4096
    rpc_timeout_s: float = 10.0
    # The deployment's data-parallel replicas R: a pushed schedule of another R is skipped
    # (None: the R of the plan this replica started with, else of the first one pushed).
    num_replicas: int | None = None

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--scheduler: {self.address!r} is not host:port")
        if not self.report_interval_s > 0 or not self.rpc_timeout_s > 0:
            raise ValueError("the report interval and RPC timeout must be positive")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("backoffs must satisfy 0 < initial <= max")
        if self.max_report_items < 1:
            raise ValueError("max_report_items must be >= 1")


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
    # Prometheus /metrics on its own HTTP port (None: off; 0: a free port). The gateway's
    # /metrics aggregates every worker over gRPC without it.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # API key and TLS of this worker's server and of its calls to its stages.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # What the plan (--schedule) predicted, shown by GetSchedule beside what is measured.
    planned: PlannedPrediction | None = None
    # Watch the scheduler's schedule and report to it (None: serve on the schedule given).
    schedule_link: ScheduleLinkConfig | None = None
