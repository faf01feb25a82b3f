"""One client cannot hold every WatchSchedule slot: a per-host limit, under the global one."""

from __future__ import annotations

from pathlib import Path

import grpc

from exegpt.errors import ErrorCode, RequestError
from exegpt.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.config import SchedulerConfig
from services.scheduler.server import peer_host
from services.scheduler.service import SchedulerCore
from tests.reliability.procs import services


def watch(stub: scheduler_pb2_grpc.SchedulerStub, replica: str) -> grpc.Future:
    """An open WatchSchedule stream, subscribed once its initial metadata arrived."""
    call = stub.WatchSchedule(scheduler_pb2.WatchScheduleRequest(replica_id=replica), timeout=60)
    call.initial_metadata()  # sent once the slot is held (or with the refusal)
    return call


def test_one_client_gets_at_most_its_share_of_watch_slots(tmp_path: Path) -> None:
    with services(tmp_path) as group:
        args = ["--port", "0", "--max-subscribers", "64", "--max-subscribers-per-client", "2"]
        scheduler = group.start("scheduler", "services.scheduler", args)
        with grpc.insecure_channel(scheduler.ready) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            held = [watch(stub, "a"), watch(stub, "b")]
            refused = watch(stub, "c")
            try:
                next(refused)
                raise AssertionError("a third stream from one client was served")
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "per client" in (exc.details() or "")
            held.pop().cancel()  # a slot given back can be taken again
            again = watch(stub, "d")
            assert again.is_active()  # held, not refused
            for call in [*held, again]:
                call.cancel()


def test_other_clients_keep_their_slots() -> None:
    core = SchedulerCore(SchedulerConfig(max_subscribers=4, max_subscribers_per_client=2))
    subscriptions = [core.subscribe("r", client="10.0.0.1") for _ in range(2)]
    try:
        core.subscribe("r", client="10.0.0.1")
        raise AssertionError("a client exceeded its limit")
    except RequestError as exc:
        assert exc.code is ErrorCode.RESOURCE_EXHAUSTED
    subscriptions += [core.subscribe("r", client="10.0.0.2") for _ in range(2)]
    assert core.num_watchers == 4
    subscriptions[0].close()
    subscriptions.append(core.subscribe("r", client="10.0.0.1"))
    assert core.num_watchers == 4
    assert peer_host("ipv4:10.0.0.2:5123") == "10.0.0.2"
    assert peer_host("ipv6:[::1]:5123") == "::1"
