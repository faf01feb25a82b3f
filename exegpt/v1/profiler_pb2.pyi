from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GridSpec(_message.Message):
    __slots__ = ("preset", "batch_sizes", "seq_lens_tokens", "kv_lens_tokens", "num_tokens", "message_bytes", "num_warmup", "num_repeats", "num_rounds", "min_sample_s")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_LENS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_WARMUP_FIELD_NUMBER: _ClassVar[int]
    NUM_REPEATS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLE_S_FIELD_NUMBER: _ClassVar[int]
    preset: str
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    seq_lens_tokens: _containers.RepeatedScalarFieldContainer[int]
    kv_lens_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: _containers.RepeatedScalarFieldContainer[int]
    message_bytes: _containers.RepeatedScalarFieldContainer[int]
    num_warmup: int
    num_repeats: int
    num_rounds: int
    min_sample_s: float
    def __init__(self, preset: _Optional[str] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., seq_lens_tokens: _Optional[_Iterable[int]] = ..., kv_lens_tokens: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[_Iterable[int]] = ..., message_bytes: _Optional[_Iterable[int]] = ..., num_warmup: _Optional[int] = ..., num_repeats: _Optional[int] = ..., num_rounds: _Optional[int] = ..., min_sample_s: _Optional[float] = ...) -> None: ...

class StartProfileRequest(_message.Message):
    __slots__ = ("model", "device", "dtype", "grid", "tp_degrees")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREES_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    dtype: str
    grid: GridSpec
    tp_degrees: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., grid: _Optional[_Union[GridSpec, _Mapping]] = ..., tp_degrees: _Optional[_Iterable[int]] = ...) -> None: ...

class ProfileProgress(_message.Message):
    __slots__ = ("stage", "num_done", "num_total", "elapsed_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    num_done: int
    num_total: int
    elapsed_s: float
    def __init__(self, stage: _Optional[str] = ..., num_done: _Optional[int] = ..., num_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class ProfileQueued(_message.Message):
    __slots__ = ("position", "device")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    position: int
    device: str
    def __init__(self, position: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ProfileDone(_message.Message):
    __slots__ = ("profile_id", "summary")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    summary: ProfileSummary
    def __init__(self, profile_id: _Optional[str] = ..., summary: _Optional[_Union[ProfileSummary, _Mapping]] = ...) -> None: ...

class ProfileEvent(_message.Message):
    __slots__ = ("queued", "progress", "done")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    queued: ProfileQueued
    progress: ProfileProgress
    done: ProfileDone
    def __init__(self, queued: _Optional[_Union[ProfileQueued, _Mapping]] = ..., progress: _Optional[_Union[ProfileProgress, _Mapping]] = ..., done: _Optional[_Union[ProfileDone, _Mapping]] = ...) -> None: ...

class ProfileSummary(_message.Message):
    __slots__ = ("profile_id", "model_name", "model_family", "config_hash", "device", "device_name", "dtype", "grid_name", "tp_degrees", "created_at", "profiling_time_s", "torch_threads", "size_bytes")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRID_NAME_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROFILING_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    model_name: str
    model_family: str
    config_hash: str
    device: str
    device_name: str
    dtype: str
    grid_name: str
    tp_degrees: _containers.RepeatedScalarFieldContainer[int]
    created_at: str
    profiling_time_s: float
    torch_threads: int
    size_bytes: int
    def __init__(self, profile_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_family: _Optional[str] = ..., config_hash: _Optional[str] = ..., device: _Optional[str] = ..., device_name: _Optional[str] = ..., dtype: _Optional[str] = ..., grid_name: _Optional[str] = ..., tp_degrees: _Optional[_Iterable[int]] = ..., created_at: _Optional[str] = ..., profiling_time_s: _Optional[float] = ..., torch_threads: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("profile_id",)
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    def __init__(self, profile_id: _Optional[str] = ...) -> None: ...

class GetProfileResponse(_message.Message):
    __slots__ = ("summary", "profile_json")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    summary: ProfileSummary
    profile_json: str
    def __init__(self, summary: _Optional[_Union[ProfileSummary, _Mapping]] = ..., profile_json: _Optional[str] = ...) -> None: ...

class ListProfilesRequest(_message.Message):
    __slots__ = ("model", "device", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListProfilesResponse(_message.Message):
    __slots__ = ("profiles", "num_invalid")
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    NUM_INVALID_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileSummary]
    num_invalid: int
    def __init__(self, profiles: _Optional[_Iterable[_Union[ProfileSummary, _Mapping]]] = ..., num_invalid: _Optional[int] = ...) -> None: ...
