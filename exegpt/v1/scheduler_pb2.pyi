from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplanReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLAN_REASON_UNSPECIFIED: _ClassVar[ReplanReason]
    REPLAN_REASON_INITIAL: _ClassVar[ReplanReason]
    REPLAN_REASON_LENGTH_DRIFT: _ClassVar[ReplanReason]
    REPLAN_REASON_STAGE_TIME_DRIFT: _ClassVar[ReplanReason]
    REPLAN_REASON_REQUESTED: _ClassVar[ReplanReason]

class StageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_KIND_UNSPECIFIED: _ClassVar[StageKind]
    STAGE_KIND_ENCODE: _ClassVar[StageKind]
    STAGE_KIND_DECODE: _ClassVar[StageKind]
    STAGE_KIND_TRANSFER: _ClassVar[StageKind]
    STAGE_KIND_OVERHEAD: _ClassVar[StageKind]
REPLAN_REASON_UNSPECIFIED: ReplanReason
REPLAN_REASON_INITIAL: ReplanReason
REPLAN_REASON_LENGTH_DRIFT: ReplanReason
REPLAN_REASON_STAGE_TIME_DRIFT: ReplanReason
REPLAN_REASON_REQUESTED: ReplanReason
STAGE_KIND_UNSPECIFIED: StageKind
STAGE_KIND_ENCODE: StageKind
STAGE_KIND_DECODE: StageKind
STAGE_KIND_TRANSFER: StageKind
STAGE_KIND_OVERHEAD: StageKind

class Schedule(_message.Message):
    __slots__ = ("kind", "encode_batch_size", "decode_batch_size", "num_decode_iterations", "num_micro_batches", "tp_degree", "num_tp_devices", "num_encode_devices", "num_replicas")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENCODE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    NUM_TP_DEVICES_FIELD_NUMBER: _ClassVar[int]
    NUM_ENCODE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    encode_batch_size: int
    decode_batch_size: int
    num_decode_iterations: int
    num_micro_batches: int
    tp_degree: int
    num_tp_devices: int
    num_encode_devices: int
    num_replicas: int
    def __init__(self, kind: _Optional[str] = ..., encode_batch_size: _Optional[int] = ..., decode_batch_size: _Optional[int] = ..., num_decode_iterations: _Optional[int] = ..., num_micro_batches: _Optional[int] = ..., tp_degree: _Optional[int] = ..., num_tp_devices: _Optional[int] = ..., num_encode_devices: _Optional[int] = ..., num_replicas: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("schedule", "feasible", "throughput_seq_s", "throughput_tokens_s", "latency_s", "memory_bytes_per_device", "utilisation_per_device", "reason")
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    UTILISATION_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    schedule: Schedule
    feasible: bool
    throughput_seq_s: float
    throughput_tokens_s: float
    latency_s: float
    memory_bytes_per_device: _containers.RepeatedScalarFieldContainer[int]
    utilisation_per_device: _containers.RepeatedScalarFieldContainer[float]
    reason: str
    def __init__(self, schedule: _Optional[_Union[Schedule, _Mapping]] = ..., feasible: _Optional[bool] = ..., throughput_seq_s: _Optional[float] = ..., throughput_tokens_s: _Optional[float] = ..., latency_s: _Optional[float] = ..., memory_bytes_per_device: _Optional[_Iterable[int]] = ..., utilisation_per_device: _Optional[_Iterable[float]] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("profile", "workload", "latency_bound_s", "no_latency_bound", "num_devices", "device_memory_bytes", "kinds", "tp_degrees", "exhaustive", "activate")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUND_S_FIELD_NUMBER: _ClassVar[int]
    NO_LATENCY_BOUND_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREES_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTIVE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    profile: str
    workload: str
    latency_bound_s: float
    no_latency_bound: bool
    num_devices: int
    device_memory_bytes: int
    kinds: _containers.RepeatedScalarFieldContainer[str]
    tp_degrees: _containers.RepeatedScalarFieldContainer[int]
    exhaustive: bool
    activate: bool
    def __init__(self, profile: _Optional[str] = ..., workload: _Optional[str] = ..., latency_bound_s: _Optional[float] = ..., no_latency_bound: _Optional[bool] = ..., num_devices: _Optional[int] = ..., device_memory_bytes: _Optional[int] = ..., kinds: _Optional[_Iterable[str]] = ..., tp_degrees: _Optional[_Iterable[int]] = ..., exhaustive: _Optional[bool] = ..., activate: _Optional[bool] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("chosen", "meets_bound", "lowest_latency", "best_by_kind", "num_evaluations", "search_wall_s", "workload", "version")
    class BestByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Prediction
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Prediction, _Mapping]] = ...) -> None: ...
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    MEETS_BOUND_FIELD_NUMBER: _ClassVar[int]
    LOWEST_LATENCY_FIELD_NUMBER: _ClassVar[int]
    BEST_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_WALL_S_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    chosen: Prediction
    meets_bound: bool
    lowest_latency: Prediction
    best_by_kind: _containers.MessageMap[str, Prediction]
    num_evaluations: int
    search_wall_s: float
    workload: str
    version: int
    def __init__(self, chosen: _Optional[_Union[Prediction, _Mapping]] = ..., meets_bound: _Optional[bool] = ..., lowest_latency: _Optional[_Union[Prediction, _Mapping]] = ..., best_by_kind: _Optional[_Mapping[str, Prediction]] = ..., num_evaluations: _Optional[int] = ..., search_wall_s: _Optional[float] = ..., workload: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WatchScheduleRequest(_message.Message):
    __slots__ = ("replica_id", "after_version")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    after_version: int
    def __init__(self, replica_id: _Optional[str] = ..., after_version: _Optional[int] = ...) -> None: ...

class LengthDrift(_message.Message):
    __slots__ = ("num_observations", "ks_distance", "ks_noise_floor", "observed_mean_tokens", "planned_mean_tokens", "relative_mean_shift", "drifted")
    NUM_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    KS_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    KS_NOISE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_MEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_MEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_MEAN_SHIFT_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    num_observations: int
    ks_distance: float
    ks_noise_floor: float
    observed_mean_tokens: float
    planned_mean_tokens: float
    relative_mean_shift: float
    drifted: bool
    def __init__(self, num_observations: _Optional[int] = ..., ks_distance: _Optional[float] = ..., ks_noise_floor: _Optional[float] = ..., observed_mean_tokens: _Optional[float] = ..., planned_mean_tokens: _Optional[float] = ..., relative_mean_shift: _Optional[float] = ..., drifted: _Optional[bool] = ...) -> None: ...

class DriftStatistics(_message.Message):
    __slots__ = ("input", "output", "encode_time_ratio", "decode_time_ratio", "num_encode_observations", "num_decode_observations")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_TIME_RATIO_FIELD_NUMBER: _ClassVar[int]
    DECODE_TIME_RATIO_FIELD_NUMBER: _ClassVar[int]
    NUM_ENCODE_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    input: LengthDrift
    output: LengthDrift
    encode_time_ratio: float
    decode_time_ratio: float
    num_encode_observations: int
    num_decode_observations: int
    def __init__(self, input: _Optional[_Union[LengthDrift, _Mapping]] = ..., output: _Optional[_Union[LengthDrift, _Mapping]] = ..., encode_time_ratio: _Optional[float] = ..., decode_time_ratio: _Optional[float] = ..., num_encode_observations: _Optional[int] = ..., num_decode_observations: _Optional[int] = ...) -> None: ...

class ScheduleUpdate(_message.Message):
    __slots__ = ("version", "reason", "schedule", "prediction", "meets_bound", "latency_bound_s", "workload", "mean_input_tokens", "mean_output_tokens", "p99_output_tokens", "drift", "detail", "published_unix_s", "placement_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    MEETS_BOUND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUND_S_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    MEAN_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    P99_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: ReplanReason
    schedule: Schedule
    prediction: Prediction
    meets_bound: bool
    latency_bound_s: float
    workload: str
    mean_input_tokens: float
    mean_output_tokens: float
    p99_output_tokens: int
    drift: DriftStatistics
    detail: str
    published_unix_s: float
    placement_json: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[_Union[ReplanReason, str]] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., meets_bound: _Optional[bool] = ..., latency_bound_s: _Optional[float] = ..., workload: _Optional[str] = ..., mean_input_tokens: _Optional[float] = ..., mean_output_tokens: _Optional[float] = ..., p99_output_tokens: _Optional[int] = ..., drift: _Optional[_Union[DriftStatistics, _Mapping]] = ..., detail: _Optional[str] = ..., published_unix_s: _Optional[float] = ..., placement_json: _Optional[str] = ...) -> None: ...

class StageTimeObservation(_message.Message):
    __slots__ = ("stage", "batch_size", "num_tokens", "num_cross_tokens", "num_layers", "tp_degree", "measured_s", "num_first_step_layers")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CROSS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    MEASURED_S_FIELD_NUMBER: _ClassVar[int]
    NUM_FIRST_STEP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    stage: StageKind
    batch_size: int
    num_tokens: int
    num_cross_tokens: int
    num_layers: int
    tp_degree: int
    measured_s: float
    num_first_step_layers: int
    def __init__(self, stage: _Optional[_Union[StageKind, str]] = ..., batch_size: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_cross_tokens: _Optional[int] = ..., num_layers: _Optional[int] = ..., tp_degree: _Optional[int] = ..., measured_s: _Optional[float] = ..., num_first_step_layers: _Optional[int] = ...) -> None: ...

class WorkloadReport(_message.Message):
    __slots__ = ("replica_id", "input_tokens", "output_tokens", "stage_times")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMES_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    input_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    stage_times: _containers.RepeatedCompositeFieldContainer[StageTimeObservation]
    def __init__(self, replica_id: _Optional[str] = ..., input_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ..., stage_times: _Optional[_Iterable[_Union[StageTimeObservation, _Mapping]]] = ...) -> None: ...

class ReportWorkloadResponse(_message.Message):
    __slots__ = ("num_reports", "num_input_lengths", "num_output_lengths", "num_stage_times", "current_version")
    NUM_REPORTS_FIELD_NUMBER: _ClassVar[int]
    NUM_INPUT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGE_TIMES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    num_reports: int
    num_input_lengths: int
    num_output_lengths: int
    num_stage_times: int
    current_version: int
    def __init__(self, num_reports: _Optional[int] = ..., num_input_lengths: _Optional[int] = ..., num_output_lengths: _Optional[int] = ..., num_stage_times: _Optional[int] = ..., current_version: _Optional[int] = ...) -> None: ...
