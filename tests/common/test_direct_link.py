"""Same-host direct links (exegpt/direct_link.py): real Unix sockets, real processes.

A same-host PULL socket listens on a link named after its address, and a same-host PUSH
socket writes there instead of through ZeroMQ. Here: messages take that path, ZeroMQ peers
still reach the same receiver, a send never blocks on a receiver that is not reading, a
broken or hostile stream is refused while the receiver keeps serving, and a SIGKILLed
receiver makes sends drop (never hang) until a new one binds the address.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from exegpt.direct_link import RECONNECT_PAUSE_S, link_name
from exegpt.transport import FrameError, TensorMessage, TensorSocket
from tests.common.test_transport import assert_same_tensors, every_dtype_tensors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


def linked_pair(context: zmq.Context, address: str) -> tuple[TensorSocket, TensorSocket]:
    receiver = TensorSocket(context, zmq.PULL, same_host=True, max_message_bytes=2**24)
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=2**16, shm_num_slots=2)
    sender.connect("shm+" + receiver.bind(address))
    return sender, receiver


def raw_link(address: str) -> socket.socket:
    """A plain connection to a receiver's link, as a buggy or hostile local process makes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(link_name(address.removeprefix("shm+")))
    return sock


def numbered(index: int, size: int = 1000) -> TensorMessage:
    return TensorMessage("activations", {"x": torch.full((size,), float(index))}, sequence=index)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "ipc://{tmp}/data.sock"])
def test_same_host_messages_go_over_the_direct_link(
    context: zmq.Context, tmp_path: Path, address: str
) -> None:
    sender, receiver = linked_pair(context, address.format(tmp=tmp_path))
    try:
        tensors = every_dtype_tensors()
        big = {"hidden": torch.randn(512, 64)}  # larger than a slot: inline, over the link
        sender.send(TensorMessage("small", tensors, attributes={"step": "1"}))
        sender.send(TensorMessage("big", big))
        first, second = receiver.recv(timeout_ms=5000), receiver.recv(timeout_ms=5000)
        assert (first.kind, first.attributes) == ("small", {"step": "1"})
        assert_same_tensors(first.tensors, tensors)
        assert second.kind == "big"
        assert_same_tensors(second.tensors, big)
        assert (sender.stats.sent_direct, sender.stats.sent_shm, sender.stats.sent_inline) == (
            2,
            1,
            1,
        )
        assert receiver.stats.received_direct == 2 and receiver.stats.received_shm == 1
    finally:
        sender.close()
        receiver.close()


def test_zmq_peers_and_direct_peers_reach_one_receiver_in_order(context: zmq.Context) -> None:
    sender, receiver = linked_pair(context, "tcp://127.0.0.1:0")
    address = (
        "tcp://127.0.0.1:" + receiver.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
    )
    over_tcp = TensorSocket(context, zmq.PUSH)  # not same-host: plain ZeroMQ TCP
    over_tcp.connect(address)
    try:
        for index in range(20):
            sender.send(numbered(index))
            over_tcp.send(numbered(100 + index))
        got = [receiver.recv(timeout_ms=5000).sequence for _ in range(40)]
        assert [s for s in got if s < 100] == list(range(20))  # each sender's order is kept
        assert [s for s in got if s >= 100] == list(range(100, 120))
        assert receiver.stats.received_direct == 20 and over_tcp.stats.sent_direct == 0
    finally:
        over_tcp.close()
        sender.close()
        receiver.close()


def test_a_send_never_waits_for_a_receiver_that_is_not_reading(context: zmq.Context) -> None:
    # 40 x 4 MiB inline (no ring slot fits them): far beyond the socket's buffer, sent from
    # the receiver's own thread. A send that waited for the reader would wait forever (and
    # give up, dropping, after the link's timeout); instead each returns, a flusher thread
    # writes on, and everything arrives, in order, none dropped.
    sender, receiver = linked_pair(context, "tcp://127.0.0.1:0")
    try:
        for index in range(40):
            sender.send(numbered(index, size=2**20))
        for index in range(40):
            received = receiver.recv(timeout_ms=10_000)
            assert received.sequence == index
            assert torch.equal(received.tensors["x"], numbered(index, size=2**20).tensors["x"])
        assert sender.stats.dropped_direct == 0
    finally:
        sender.close()
        receiver.close()


def test_broken_or_hostile_streams_are_refused_and_the_receiver_keeps_serving(
    context: zmq.Context,
) -> None:
    sender, receiver = linked_pair(context, "tcp://127.0.0.1:0")
    address = receiver.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        cases = [
            (struct.pack("=4I", 0xDEADBEEF, 10, 0, 0), "preamble"),
            (struct.pack("=4I", 0x45584431, 10**6, 0, 0), "header"),
            (
                struct.pack("=4I", 0x45584431, 4, 1, 0) + struct.pack("=Q", 2**40) + b"head",
                "exceeds",
            ),
            (struct.pack("=4I", 0x45584431, 100, 0, 0) + b"x" * 10, "mid-message"),
            (struct.pack("=4I", 0x45584431, 3, 0, 0) + b"\xff\xff\xff", "malformed"),
        ]
        for raw_bytes, match in cases:
            hostile = raw_link(address)
            hostile.sendall(raw_bytes)
            hostile.close()  # the peer goes away, mid-message in some cases
            with pytest.raises(FrameError, match=match):
                receiver.recv(timeout_ms=5000)
        sender.send(numbered(7))
        received = receiver.recv(timeout_ms=5000)
        assert received.sequence == 7 and torch.equal(
            received.tensors["x"], numbered(7).tensors["x"]
        )
    finally:
        sender.close()
        receiver.close()


RECEIVER_SCRIPT = textwrap.dedent(
    """
    import sys, zmq
    from exegpt.transport import TensorSocket
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL, same_host=True)
    print(receiver.bind(sys.argv[1]), flush=True)
    while True:
        message = receiver.recv()
        print(message.sequence, int(message.tensors["x"][0]), flush=True)
    """
)


def start_receiver(address: str) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER_SCRIPT, address],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def test_a_killed_receiver_makes_sends_drop_not_hang_until_a_new_one_binds(
    context: zmq.Context, tmp_path: Path
) -> None:
    address = f"ipc://{tmp_path}/stage.sock"
    child, bound = start_receiver(address)
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=2**16, shm_num_slots=4, shm_wait_s=0)
    try:
        sender.connect("shm+" + bound)
        sender.send(numbered(1))
        assert child.stdout is not None and child.stdout.readline().split() == ["1", "1"]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        for index in range(2, 12):  # each returns: written into the void, or dropped
            sender.send(numbered(index))
        assert sender.stats.dropped_direct >= 1
        # A new receiver at the same address gets later messages, once the pause is over.
        child, _ = start_receiver(address)
        time.sleep(RECONNECT_PAUSE_S)
        sender.send(numbered(99))
        assert child.stdout is not None and child.stdout.readline().split() == ["99", "99"]
    finally:
        sender.close()
        child.kill()
        child.wait()
