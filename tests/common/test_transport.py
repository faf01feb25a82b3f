"""ZeroMQ tensor transport: round trips over real sockets, and refusal of bad frames.

Both kinds of hand-off run here: inline over plain TCP, and same-host through the sender's
shared-memory ring (shm+ipc://, shm+tcp:// to loopback). Ring internals, forged references
and a hand-off across two processes are in test_shm_ring.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from exegpt.transport import (
    FrameError,
    TensorMessage,
    TensorSocket,
    decode,
    encode,
    is_same_host,
)
from exegpt.v1 import transport_pb2

ALL_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
)


def every_dtype_tensors() -> dict[str, torch.Tensor]:
    """One tensor per supported dtype, plus empty, scalar and strided ones."""
    generator = torch.Generator().manual_seed(7)
    tensors = {
        str(dtype): (torch.randn(3, 5, generator=generator) * 50).to(dtype) for dtype in ALL_DTYPES
    }
    tensors["empty"] = torch.zeros(0, 4)
    tensors["empty_bf16"] = torch.zeros(2, 0, dtype=torch.bfloat16)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tensors["strided"] = torch.randn(6, 6, generator=generator)[:, ::2]
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


@pytest.fixture(params=["tcp", "shm+ipc", "shm+tcp"])
def any_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple]:
    """A connected PUSH/PULL pair of each kind: inline TCP, and shared memory over IPC/TCP."""
    addresses = {
        "tcp": "tcp://127.0.0.1:0",
        "shm+ipc": f"shm+ipc://{tmp_path}/data.sock",
        "shm+tcp": "shm+tcp://127.0.0.1:0",
    }
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=2**20, shm_num_slots=4)
    sender.connect(receiver.bind(addresses[request.param]))
    yield request.param, sender, receiver
    sender.close()
    receiver.close()
    context.term()


def test_every_dtype_round_trips_over_both_kinds_of_hand_off(any_pair) -> None:
    kind, sender, receiver = any_pair
    tensors = every_dtype_tensors()
    sender.send(TensorMessage("activations", tensors, sequence=3, attributes={"step": "1"}))
    received = receiver.recv(timeout_ms=5000)
    assert received.kind == "activations" and received.sequence == 3
    assert received.attributes == {"step": "1"}
    assert_same_tensors(received.tensors, tensors)
    used_shm = kind.startswith("shm")
    assert (sender.stats.sent_shm, sender.stats.sent_inline) == (int(used_shm), int(not used_shm))
    assert receiver.stats.received_shm == int(used_shm)


def test_large_tensors_round_trip_over_both_kinds(any_pair) -> None:
    _, sender, receiver = any_pair
    # 3 MiB + 1 MiB: larger than a slot of the fixture's ring, so shm pairs go inline here;
    # a ring sized for it carries the same tensors in test_shm_ring.py.
    tensors = {"hidden": torch.randn(768, 1024), "ids": torch.arange(2**17, dtype=torch.int64)}
    for step in range(3):
        tensors["hidden"][0, 0] = step
        sender.send(TensorMessage("activations", tensors, sequence=step))
        received = receiver.recv(timeout_ms=10_000)
        assert received.sequence == step
        assert_same_tensors(received.tensors, tensors)


def test_shared_memory_is_only_offered_to_peers_on_this_host() -> None:
    assert is_same_host("ipc:///tmp/x.sock") and is_same_host("shm+ipc:///tmp/x.sock")
    assert is_same_host("tcp://127.0.0.1:5555") and is_same_host("tcp://localhost:5555")
    assert not is_same_host("tcp://192.0.2.1:5555")  # TEST-NET-1: never this machine
    context = zmq.Context()
    sender = TensorSocket(context, zmq.PUSH)
    try:
        with pytest.raises(ValueError, match="this host"):
            sender.connect("shm+tcp://192.0.2.1:5555")
        assert not sender.same_host
    finally:
        sender.close()
        context.term()


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


def test_poll_tells_whether_a_message_is_ready_without_taking_it(pair) -> None:
    sender, receiver = pair
    assert receiver.poll(0) is False and receiver.poll(20) is False
    sender.send(TensorMessage("activations", {"ids": torch.arange(3)}, sequence=4))
    assert receiver.poll(5000) is True and receiver.poll(0) is True  # still there
    assert receiver.recv(timeout_ms=0).sequence == 4
    assert receiver.poll(0) is False


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


def test_a_zero_size_tensor_with_unaddressable_dimensions_is_refused() -> None:
    # No bytes, but strides past int64: torch itself would raise a RuntimeError, which a
    # stage's receive loop does not expect from a peer's frame.
    header = transport_pb2.FrameHeader()
    header.ParseFromString(bytes(encode(TensorMessage("kv", {"k": torch.ones(0)}))[0]))
    del header.tensors[0].shape[:]
    header.tensors[0].shape.extend([0, 2**62, 2**62])
    with pytest.raises(FrameError, match="too large to address"):
        decode([header.SerializeToString(), b""])


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


def test_slot_headers_keep_long_names_and_many_dims(tmp_path: Path) -> None:
    # A slot header's tensor entries are appended already serialised (and reused from one
    # message to the next): entries over 127 bytes need a two-byte length, and the same
    # entry sent twice must still parse as its own tensor.
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    sender = TensorSocket(context, zmq.PUSH)
    sender.connect(receiver.bind(f"shm+ipc://{tmp_path}/long.sock"))
    try:
        tensors = {
            "n" * 300: torch.arange(2 * 3 * 1 * 2 * 5, dtype=torch.int32).view(2, 3, 1, 2, 5),
            "short": torch.tensor([1.5, -2.0], dtype=torch.float64),
        }
        for step in range(2):
            sender.send(TensorMessage("kv", tensors, sequence=step))
            received = receiver.recv(timeout_ms=5000)
            assert received.sequence == step
            assert_same_tensors(received.tensors, tensors)
        assert receiver.stats.received_shm == 2
    finally:
        sender.close()
        receiver.close()
        context.term()


def test_slot_headers_name_each_tensor_where_this_message_placed_it() -> None:
    # The sender remembers each tensor's header entry but adds its offset per message: a
    # decode step's growing slot list moves the tensors after it from one step to the next.
    from exegpt.frames import encode_into_ring
    from exegpt.shm_ring import ShmRing, aligned_bytes

    ring = ShmRing(slot_bytes=64 * 1024, num_slots=4)
    try:
        for step in (1, 2, 3):
            tensors = {
                "read_slots": torch.arange(24 * step, dtype=torch.int64),
                "tokens": torch.zeros(32, 1, dtype=torch.int64),
                "scale": torch.ones((), dtype=torch.float32),
            }
            header = transport_pb2.FrameHeader()
            raw = encode_into_ring(TensorMessage("decode", tensors), ring)
            assert raw is not None
            header.ParseFromString(raw)
            offset, entries = 0, []
            for name, tensor in tensors.items():
                entries.append((name, str(tensor.dtype)[6:], list(tensor.shape), offset))
                offset += aligned_bytes(tensor.nbytes)
            metas = [(m.name, m.dtype, list(m.shape), m.shm_offset) for m in header.tensors]
            assert metas == entries
            assert entries[1][3] == aligned_bytes(24 * step * 8)  # moved with the slot list
    finally:
        ring.close()
