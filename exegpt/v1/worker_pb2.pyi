from exegpt.v1 import generate_pb2 as _generate_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("num_waiting", "num_running", "kv_used_bytes", "kv_capacity_bytes", "kv_num_free_blocks", "kv_num_blocks", "num_finished", "num_aborted", "batching", "num_pending_prefill_tokens", "num_remaining_decode_tokens", "engine_policy", "num_preemptions", "num_recomputed_tokens", "queue_time_s")
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
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_capacity_bytes: _Optional[int] = ..., kv_num_free_blocks: _Optional[int] = ..., kv_num_blocks: _Optional[int] = ..., num_finished: _Optional[int] = ..., num_aborted: _Optional[int] = ..., batching: _Optional[str] = ..., num_pending_prefill_tokens: _Optional[int] = ..., num_remaining_decode_tokens: _Optional[int] = ..., engine_policy: _Optional[str] = ..., num_preemptions: _Optional[int] = ..., num_recomputed_tokens: _Optional[int] = ..., queue_time_s: _Optional[float] = ...) -> None: ...
