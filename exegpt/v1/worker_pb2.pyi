from exegpt.v1 import generate_pb2 as _generate_pb2
from exegpt.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetScheduleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("router_id",)
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    def __init__(self, router_id: _Optional[str] = ...) -> None: ...

class LoadUpdate(_message.Message):
    __slots__ = ("num_pending_prefill_tokens", "num_remaining_decode_tokens", "num_waiting", "num_running", "kv_used_bytes", "kv_capacity_bytes", "num_preemptions", "num_accepted", "worker_id")
    NUM_PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REMAINING_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    num_pending_prefill_tokens: int
    num_remaining_decode_tokens: int
    num_waiting: int
    num_running: int
    kv_used_bytes: int
    kv_capacity_bytes: int
    num_preemptions: int
    num_accepted: int
    worker_id: str
    def __init__(self, num_pending_prefill_tokens: _Optional[int] = ..., num_remaining_decode_tokens: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_capacity_bytes: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., num_accepted: _Optional[int] = ..., worker_id: _Optional[str] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("num_waiting", "num_running", "kv_used_bytes", "kv_capacity_bytes", "kv_num_free_blocks", "kv_num_blocks", "num_finished", "num_aborted", "batching", "num_pending_prefill_tokens", "num_remaining_decode_tokens", "engine_policy", "num_preemptions", "num_recomputed_tokens", "queue_time_s", "step_totals", "busy_fraction", "head_waits", "step_totals_by_rows")
    class HeadWaitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    NUM_ABORTED_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REMAINING_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_POLICY_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_RECOMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    STEP_TOTALS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    HEAD_WAITS_FIELD_NUMBER: _ClassVar[int]
    STEP_TOTALS_BY_ROWS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    kv_used_bytes: int
    kv_capacity_bytes: int
    kv_num_free_blocks: int
    kv_num_blocks: int
    num_finished: int
    num_aborted: int
    batching: str
    num_pending_prefill_tokens: int
    num_remaining_decode_tokens: int
    engine_policy: str
    num_preemptions: int
    num_recomputed_tokens: int
    queue_time_s: float
    step_totals: _containers.RepeatedCompositeFieldContainer[StepTotals]
    busy_fraction: float
    head_waits: _containers.ScalarMap[str, int]
    step_totals_by_rows: _containers.RepeatedCompositeFieldContainer[StepTotals]
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_capacity_bytes: _Optional[int] = ..., kv_num_free_blocks: _Optional[int] = ..., kv_num_blocks: _Optional[int] = ..., num_finished: _Optional[int] = ..., num_aborted: _Optional[int] = ..., batching: _Optional[str] = ..., num_pending_prefill_tokens: _Optional[int] = ..., num_remaining_decode_tokens: _Optional[int] = ..., engine_policy: _Optional[str] = ..., num_preemptions: _Optional[int] = ..., num_recomputed_tokens: _Optional[int] = ..., queue_time_s: _Optional[float] = ..., step_totals: _Optional[_Iterable[_Union[StepTotals, _Mapping]]] = ..., busy_fraction: _Optional[float] = ..., head_waits: _Optional[_Mapping[str, int]] = ..., step_totals_by_rows: _Optional[_Iterable[_Union[StepTotals, _Mapping]]] = ...) -> None: ...

class StepTotals(_message.Message):
    __slots__ = ("kind", "num_steps", "num_rows", "forward_s", "host_s", "min_rows", "compute_s")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    HOST_S_FIELD_NUMBER: _ClassVar[int]
    MIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    kind: str
    num_steps: int
    num_rows: int
    forward_s: float
    host_s: float
    min_rows: int
    compute_s: float
    def __init__(self, kind: _Optional[str] = ..., num_steps: _Optional[int] = ..., num_rows: _Optional[int] = ..., forward_s: _Optional[float] = ..., host_s: _Optional[float] = ..., min_rows: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class SchedulePrediction(_message.Message):
    __slots__ = ("throughput_seq_s", "throughput_tokens_s", "latency_s", "meets_bound", "latency_bound_s", "workload")
    THROUGHPUT_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    MEETS_BOUND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUND_S_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    throughput_seq_s: float
    throughput_tokens_s: float
    latency_s: float
    meets_bound: bool
    latency_bound_s: float
    workload: str
    def __init__(self, throughput_seq_s: _Optional[float] = ..., throughput_tokens_s: _Optional[float] = ..., latency_s: _Optional[float] = ..., meets_bound: _Optional[bool] = ..., latency_bound_s: _Optional[float] = ..., workload: _Optional[str] = ...) -> None: ...

class ScheduleSwitch(_message.Message):
    __slots__ = ("schedule", "redeployed", "duration_s")
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    REDEPLOYED_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    schedule: _scheduler_pb2.Schedule
    redeployed: bool
    duration_s: float
    def __init__(self, schedule: _Optional[_Union[_scheduler_pb2.Schedule, _Mapping]] = ..., redeployed: _Optional[bool] = ..., duration_s: _Optional[float] = ...) -> None: ...

class ScheduleStatus(_message.Message):
    __slots__ = ("kind", "schedule", "placement_json", "source", "version", "reason", "pending_version", "prediction", "switches", "elapsed_s", "num_finished", "measured_throughput_seq_s", "measured_p99_length_latency_s", "measured_p99_output_tokens", "scheduler", "scheduler_connected")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    MEASURED_THROUGHPUT_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_P99_LENGTH_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_P99_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    schedule: _scheduler_pb2.Schedule
    placement_json: str
    source: str
    version: int
    reason: str
    pending_version: int
    prediction: SchedulePrediction
    switches: _containers.RepeatedCompositeFieldContainer[ScheduleSwitch]
    elapsed_s: float
    num_finished: int
    measured_throughput_seq_s: float
    measured_p99_length_latency_s: float
    measured_p99_output_tokens: int
    scheduler: str
    scheduler_connected: bool
    def __init__(self, kind: _Optional[str] = ..., schedule: _Optional[_Union[_scheduler_pb2.Schedule, _Mapping]] = ..., placement_json: _Optional[str] = ..., source: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ..., pending_version: _Optional[int] = ..., prediction: _Optional[_Union[SchedulePrediction, _Mapping]] = ..., switches: _Optional[_Iterable[_Union[ScheduleSwitch, _Mapping]]] = ..., elapsed_s: _Optional[float] = ..., num_finished: _Optional[int] = ..., measured_throughput_seq_s: _Optional[float] = ..., measured_p99_length_latency_s: _Optional[float] = ..., measured_p99_output_tokens: _Optional[int] = ..., scheduler: _Optional[str] = ..., scheduler_connected: _Optional[bool] = ...) -> None: ...
