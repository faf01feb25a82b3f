"""A long-lived stage does not pile up sockets and rings across loads.

A real StageRuntime (the tiny default model, real ZeroMQ and /dev/shm): each Load names the
engine it answers to; a worker that restarts binds a new reply address and loads again. The
stage's socket and ring to the old address must go with the old load.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from exegpt.models.defaults import DEFAULT_MODEL_NAME
from exegpt.shm_sweep import SHM_DIR
from exegpt.transport import TensorMessage, TensorSocket
from exegpt.v1 import stage_pb2
from services.worker.stage.runtime import StageRuntime


@pytest.fixture()
def runtime() -> Iterator[StageRuntime]:
    stage = StageRuntime("127.0.0.1", "cpu")
    stage.start()
    yield stage
    stage.stop()


def load_request(engine_address: str, load_id: str) -> stage_pb2.LoadStageRequest:
    return stage_pb2.LoadStageRequest(
        model=DEFAULT_MODEL_NAME,
        encoder_start=0,
        encoder_stop=4,
        decoder_start=0,
        decoder_stop=4,
        tp_rank=0,
        tp_degree=1,
        num_kv_blocks=4,
        kv_block_size_tokens=4,
        dtype="float32",
        load_id=load_id,
        engine_address=engine_address,
        next_after_decoder=[engine_address],
    )


def answer_from_stage(
    context: zmq.Context, runtime: StageRuntime, engine: TensorSocket, load_id: str
) -> TensorMessage:
    """A step the stage cannot run: it answers the engine with an error, over its fanout."""
    push = TensorSocket(context, zmq.PUSH)
    push.connect(runtime.data_address)
    try:
        push.send(
            TensorMessage("unknown-kind", {}, attributes={"step_id": "1", "load_id": load_id})
        )
        return engine.recv(timeout_ms=10_000)
    finally:
        push.close()  # only now: a socket closed at once drops what it has not sent yet


def test_a_reload_with_a_new_reply_address_leaves_one_ring(runtime: StageRuntime) -> None:
    context = zmq.Context()
    first = TensorSocket(context, zmq.PULL, same_host=True)
    second = TensorSocket(context, zmq.PULL, same_host=True)
    first_address = first.bind("tcp://127.0.0.1:0")
    second_address = second.bind("tcp://127.0.0.1:0")
    fanout = runtime.fanout
    try:
        runtime.load(load_request(first_address, "load-1"))
        assert answer_from_stage(context, runtime, first, "load-1").kind == "error"
        old_ring = SHM_DIR / fanout.shm_segments()[first_address]
        assert old_ring.exists()

        # The worker restarted: a new reply address, a new load id.
        runtime.load(load_request(second_address, "load-2"))
        assert answer_from_stage(context, runtime, second, "load-2").kind == "error"

        assert not old_ring.exists()
        assert fanout.peers == [second_address]
        assert list(fanout.shm_segments()) == [second_address]
        assert (SHM_DIR / fanout.shm_segments()[second_address]).exists()
    finally:
        first.close()
        second.close()
        context.term()
