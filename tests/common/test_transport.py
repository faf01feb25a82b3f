"""ZeroMQ tensor transport: round trips over real sockets, and refusal of bad frames."""

from __future__ import annotations

import pytest
import torch
import zmq

from exegpt.transport import FrameError, TensorMessage, TensorSocket, decode, encode


@pytest.fixture()
def pair():
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    address = receiver.bind("tcp://127.0.0.1:0")
    sender = TensorSocket(context, zmq.PUSH)
    sender.connect(address)
    yield sender, receiver
    sender.close()
    receiver.close()
    context.term()


def test_round_trip_over_tcp_keeps_values_dtypes_and_metadata(pair) -> None:
    sender, receiver = pair
    tensors = {
        "hidden": torch.randn(3, 5, 8),
        "half": torch.randn(4, 2).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 6)[:, ::2],
    }
    sender.send(
        TensorMessage("activations", tensors, sequence=9, trace_context={"traceparent": "00-a"}),
        extra={"request_id": "r1"},
    )
    received = receiver.recv(timeout_ms=5000)
    assert received.kind == "activations" and received.sequence == 9
    assert received.trace_context == {"traceparent": "00-a"}
    assert received.attributes == {"request_id": "r1"}
    for name, tensor in tensors.items():
        assert received.tensors[name].dtype == tensor.dtype
        assert torch.equal(received.tensors[name], tensor)


def test_receive_times_out_cleanly(pair) -> None:
    _, receiver = pair
    with pytest.raises(TimeoutError):
        receiver.recv(timeout_ms=50)


def test_frames_that_disagree_with_the_header_are_refused() -> None:
    frames = encode(TensorMessage("kv", {"k": torch.ones(2, 3)}))
    with pytest.raises(FrameError, match="bytes"):
        decode([frames[0], bytes(frames[1])[:-4]])
    with pytest.raises(FrameError, match="tensors"):
        decode([frames[0]])
    with pytest.raises(FrameError, match="malformed"):
        decode([b"\xff\xff\xff", b""])
    with pytest.raises(FrameError, match="empty"):
        decode([])


def test_oversized_messages_are_dropped_by_the_socket() -> None:
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL, max_message_bytes=1024)
    address = receiver.bind("tcp://127.0.0.1:0")
    sender = TensorSocket(context, zmq.PUSH)
    sender.connect(address)
    try:
        sender.send(TensorMessage("big", {"x": torch.zeros(4096)}))
        sender.send(TensorMessage("small", {"x": torch.zeros(4)}))
        # The peer that sent more than the limit is disconnected; nothing big arrives.
        with pytest.raises(TimeoutError):
            while True:
                assert receiver.recv(timeout_ms=300).kind != "big"
    finally:
        sender.close()
        receiver.close()
        context.term()
