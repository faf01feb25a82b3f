"""`Schedule` <-> its protobuf message (exegpt.v1.Schedule), for every service that sends or
receives one: the scheduler publishes schedules, workers apply them and report what they run.
"""

from __future__ import annotations

from exegpt.schedule import Schedule, ScheduleKind
from exegpt.v1 import scheduler_pb2


def schedule_to_proto(schedule: Schedule) -> scheduler_pb2.Schedule:
    return scheduler_pb2.Schedule(**schedule.to_dict())


def schedule_from_proto(message: scheduler_pb2.Schedule) -> Schedule:
    """A schedule message as the shared dataclass; raises ValueError for an unknown kind or
    control variables out of range."""
    return Schedule(
        kind=ScheduleKind(message.kind),
        encode_batch_size=message.encode_batch_size,
        decode_batch_size=message.decode_batch_size,
        num_decode_iterations=message.num_decode_iterations,
        num_micro_batches=message.num_micro_batches,
        tp_degree=message.tp_degree,
        num_tp_devices=message.num_tp_devices,
        num_encode_devices=message.num_encode_devices,
        num_replicas=message.num_replicas or 1,
    )
