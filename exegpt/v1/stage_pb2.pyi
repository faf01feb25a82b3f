from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeStageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("data_address", "loaded", "free_port", "model", "encoder_start", "encoder_stop", "decoder_start", "decoder_stop", "tp_rank", "tp_degree", "load_id")
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    FREE_PORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODER_START_FIELD_NUMBER: _ClassVar[int]
    ENCODER_STOP_FIELD_NUMBER: _ClassVar[int]
    DECODER_START_FIELD_NUMBER: _ClassVar[int]
    DECODER_STOP_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    LOAD_ID_FIELD_NUMBER: _ClassVar[int]
    data_address: str
    loaded: bool
    free_port: int
    model: str
    encoder_start: int
    encoder_stop: int
    decoder_start: int
    decoder_stop: int
    tp_rank: int
    tp_degree: int
    load_id: str
    def __init__(self, data_address: _Optional[str] = ..., loaded: _Optional[bool] = ..., free_port: _Optional[int] = ..., model: _Optional[str] = ..., encoder_start: _Optional[int] = ..., encoder_stop: _Optional[int] = ..., decoder_start: _Optional[int] = ..., decoder_stop: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_degree: _Optional[int] = ..., load_id: _Optional[str] = ...) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("model", "encoder_start", "encoder_stop", "decoder_start", "decoder_stop", "tp_rank", "tp_degree", "tp_init_method", "num_kv_blocks", "kv_block_size_tokens", "next_after_encoder", "next_after_decoder", "dtype", "load_id", "engine_address", "role")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODER_START_FIELD_NUMBER: _ClassVar[int]
    ENCODER_STOP_FIELD_NUMBER: _ClassVar[int]
    DECODER_START_FIELD_NUMBER: _ClassVar[int]
    DECODER_STOP_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    TP_INIT_METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_ENCODER_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_DECODER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOAD_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    encoder_start: int
    encoder_stop: int
    decoder_start: int
    decoder_stop: int
    tp_rank: int
    tp_degree: int
    tp_init_method: str
    num_kv_blocks: int
    kv_block_size_tokens: int
    next_after_encoder: _containers.RepeatedScalarFieldContainer[str]
    next_after_decoder: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    load_id: str
    engine_address: str
    role: str
    def __init__(self, model: _Optional[str] = ..., encoder_start: _Optional[int] = ..., encoder_stop: _Optional[int] = ..., decoder_start: _Optional[int] = ..., decoder_stop: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_degree: _Optional[int] = ..., tp_init_method: _Optional[str] = ..., num_kv_blocks: _Optional[int] = ..., kv_block_size_tokens: _Optional[int] = ..., next_after_encoder: _Optional[_Iterable[str]] = ..., next_after_decoder: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., load_id: _Optional[str] = ..., engine_address: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class GetStageStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("num_steps", "num_errors", "num_bad_frames", "compute_s", "kv_capacity_bytes")
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NUM_BAD_FRAMES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_steps: int
    num_errors: int
    num_bad_frames: int
    compute_s: float
    kv_capacity_bytes: int
    def __init__(self, num_steps: _Optional[int] = ..., num_errors: _Optional[int] = ..., num_bad_frames: _Optional[int] = ..., compute_s: _Optional[float] = ..., kv_capacity_bytes: _Optional[int] = ...) -> None: ...

class StopStageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopStageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
