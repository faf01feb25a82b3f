"""A stage past the first gets a decode step's batch from the engine and its hidden state from
the stage before (two connections, either order), and runs it as if both came together.

A real StageRuntime (the tiny default model's last two decoder layers, real ZeroMQ and shared
memory): the test plays the engine (batch out, tokens back) and the stage before (hidden
states out).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import zmq

from exegpt.models.batch import BatchBuilder, batch_frame_tensors
from exegpt.models.defaults import DEFAULT_MODEL_NAME, default_model_config
from exegpt.models.kv_cache import SequenceKV
from exegpt.transport import TensorMessage, TensorSocket
from exegpt.v1 import stage_pb2
from services.worker.sampling import RowSampling, sampling_tensors
from services.worker.stage.runtime import StageRuntime
from services.worker.wire import BATCH_KIND, BATCH_SENT

LOAD_ID = "load-1"
NUM_BLOCKS, BLOCK_TOKENS = 8, 4


class Peers:
    """The engine's result socket and send socket, and the previous stage's send socket."""

    def __init__(self, runtime: StageRuntime) -> None:
        self.context = zmq.Context()
        self.results = TensorSocket(self.context, zmq.PULL, same_host=True)
        self.address = self.results.bind("tcp://127.0.0.1:0")
        self.engine = TensorSocket(self.context, zmq.PUSH, same_host=True)
        self.previous = TensorSocket(self.context, zmq.PUSH, same_host=True)
        for socket in (self.engine, self.previous):
            socket.connect(runtime.data_address)

    def close(self) -> None:
        for socket in (self.results, self.engine, self.previous):
            socket.close()
        self.context.term()


@pytest.fixture()
def stage_and_peers() -> Iterator[tuple[StageRuntime, Peers]]:
    runtime = StageRuntime("127.0.0.1", "cpu")
    runtime.start()
    peers = Peers(runtime)
    runtime.load(
        stage_pb2.LoadStageRequest(
            model=DEFAULT_MODEL_NAME,
            decoder_start=2,
            decoder_stop=4,
            tp_degree=1,
            num_kv_blocks=NUM_BLOCKS,
            kv_block_size_tokens=BLOCK_TOKENS,
            dtype="float32",
            load_id=LOAD_ID,
            engine_address=peers.address,
            next_after_decoder=[peers.address],
        )  # fmt: skip
    )
    yield runtime, peers
    peers.close()
    runtime.stop()


def step_input() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A two-row decode step's batch and sampling tensors, and a hidden state for it."""
    config = default_model_config()
    builder = BatchBuilder(config, BLOCK_TOKENS, NUM_BLOCKS * BLOCK_TOKENS, torch.device("cpu"))
    seqs = [SequenceKV([0], 1, [1], 3), SequenceKV([2], 2, [3], 2)]
    tensors = {
        **batch_frame_tensors(builder.decode(seqs, [5, 9])),
        **sampling_tensors([RowSampling(0.0, 1.0, 0, 1), RowSampling(0.0, 1.0, 0, 1)]),
    }
    return tensors, torch.randn(2, 1, config.d_model, generator=torch.Generator().manual_seed(0))


def attributes(step: int) -> dict[str, str]:
    return {"step_id": str(step), "load_id": LOAD_ID}


def parted(step: int) -> dict[str, str]:
    """A step whose batch the engine sends apart from its hidden state."""
    return {**attributes(step), BATCH_SENT: "1"}


def tokens_of(message: TensorMessage) -> list[int]:
    assert message.kind == "result", message.attributes
    return message.tensors["token_ids"].tolist()


def test_batch_from_the_engine_and_hidden_from_the_stage_before_give_the_same_tokens(
    stage_and_peers: tuple[StageRuntime, Peers],
) -> None:
    runtime, peers = stage_and_peers
    tensors, hidden = step_input()
    # The reference: the whole step in one message, as the stage before used to forward it.
    peers.previous.send(
        TensorMessage("decode", {**tensors, "hidden": hidden}, attributes=attributes(1))
    )
    expected = tokens_of(peers.results.recv(timeout_ms=10_000))

    # The batch first (the usual order: the engine sends it as the first stage starts).
    peers.engine.send(TensorMessage(BATCH_KIND, tensors, attributes=parted(2)))
    peers.previous.send(TensorMessage("decode", {"hidden": hidden}, attributes=parted(2)))
    second = peers.results.recv(timeout_ms=10_000)
    assert second.attributes["step_id"] == "2"
    assert tokens_of(second) == expected

    # The hidden state first: it waits for its batch.
    peers.previous.send(TensorMessage("decode", {"hidden": hidden}, attributes=parted(3)))
    with pytest.raises(TimeoutError):
        peers.results.recv(timeout_ms=300)
    peers.engine.send(TensorMessage(BATCH_KIND, tensors, attributes=parted(3)))
    third = peers.results.recv(timeout_ms=10_000)
    assert third.attributes["step_id"] == "3"
    assert tokens_of(third) == expected
    assert runtime.counters.num_bad_frames == 0


def test_a_hidden_state_for_an_unknown_step_is_refused_and_the_stage_keeps_serving(
    stage_and_peers: tuple[StageRuntime, Peers],
) -> None:
    runtime, peers = stage_and_peers
    tensors, hidden = step_input()
    peers.engine.send(TensorMessage(BATCH_KIND, tensors, attributes=parted(4)))
    step = TensorMessage("decode", {"hidden": hidden}, attributes=parted(4))
    peers.previous.send(step)
    assert len(tokens_of(peers.results.recv(timeout_ms=10_000))) == 2
    peers.previous.send(step)  # a replay: step 4 has run, its batch is gone
    refusal = peers.results.recv(timeout_ms=10_000)
    assert refusal.kind == "error"
    assert refusal.attributes["step_id"] == "4"
    assert refusal.attributes["load_id"] == LOAD_ID
    assert "refused" in refusal.attributes["error"]
    assert runtime.counters.num_bad_frames == 1

    # A step of an earlier load is dropped, not refused; the next step runs as before.
    peers.engine.send(
        TensorMessage(BATCH_KIND, tensors, attributes={"step_id": "5", "load_id": "old"})
    )
    peers.engine.send(TensorMessage(BATCH_KIND, tensors, attributes=parted(5)))
    peers.previous.send(TensorMessage("decode", {"hidden": hidden}, attributes=parted(5)))
    answer = peers.results.recv(timeout_ms=10_000)
    assert answer.attributes["step_id"] == "5" and len(tokens_of(answer)) == 2
    assert runtime.counters.num_bad_frames == 1
