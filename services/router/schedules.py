"""`GET /schedule`: every replica's schedule as JSON, asked of each healthy one at once
(Worker.GetSchedule): what it runs, what its plan predicted, its switches so far, and the
throughput and p99-length latency measured since the schedule started."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from exegpt.v1 import scheduler_pb2, worker_pb2
from services.router.replicas import Replica, ReplicaPool

SCHEDULE_TIMEOUT_S = 2.0


def _schedule(message: scheduler_pb2.Schedule) -> dict[str, Any]:
    return {
        "kind": message.kind,
        "encode_batch_size": message.encode_batch_size,
        "decode_batch_size": message.decode_batch_size,
        "num_decode_iterations": message.num_decode_iterations,
        "num_micro_batches": message.num_micro_batches,
        "tp_degree": message.tp_degree,
        "num_tp_devices": message.num_tp_devices,
        "num_encode_devices": message.num_encode_devices,
        "num_replicas": message.num_replicas or 1,  # the plan's data-parallel replicas
    }


def _prediction(message: worker_pb2.SchedulePrediction) -> dict[str, Any]:
    return {
        "throughput_seq_s": message.throughput_seq_s,
        "throughput_tokens_s": message.throughput_tokens_s,
        "latency_s": message.latency_s,
        "meets_bound": message.meets_bound,
        "latency_bound_s": message.latency_bound_s or None,
        "workload": message.workload,
    }


def status_to_dict(status: worker_pb2.ScheduleStatus) -> dict[str, Any]:
    """A replica's ScheduleStatus as the JSON the gateway returns (nulls where unset)."""
    return {
        "kind": status.kind,
        "schedule": _schedule(status.schedule) if status.HasField("schedule") else None,
        "placement": json.loads(status.placement_json) if status.placement_json else None,
        "source": status.source,
        "version": status.version,
        "reason": status.reason or None,
        "pending_version": status.pending_version or None,
        "prediction": _prediction(status.prediction) if status.HasField("prediction") else None,
        "switches": [
            {
                "schedule": _schedule(switch.schedule),
                "redeployed": switch.redeployed,
                "duration_s": switch.duration_s,
            }
            for switch in status.switches
        ],
        "measured": {
            "elapsed_s": status.elapsed_s,
            "num_finished": status.num_finished,
            "throughput_seq_s": status.measured_throughput_seq_s,
            "p99_length_latency_s": status.measured_p99_length_latency_s or None,
            "p99_output_tokens": status.measured_p99_output_tokens or None,
        },
        "scheduler": status.scheduler or None,
        "scheduler_connected": status.scheduler_connected,
    }


async def _replica_schedule(replica: Replica, timeout_s: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"address": replica.address, "healthy": replica.healthy}
    if not replica.healthy:
        return {**entry, "schedule": None, "error": "replica is not healthy"}
    try:
        status = await replica.worker.GetSchedule(
            worker_pb2.GetScheduleRequest(), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        return {**entry, "schedule": None, "error": f"{exc.code().name}: {exc.details()}"}
    return {**entry, **status_to_dict(status)}


async def replica_schedules(
    pool: ReplicaPool, timeout_s: float = SCHEDULE_TIMEOUT_S
) -> list[dict[str, Any]]:
    """One entry per replica, in the router's order; a replica that is unhealthy or did not
    answer carries `error` instead of its schedule."""
    return list(await asyncio.gather(*(_replica_schedule(r, timeout_s) for r in pool.replicas)))
