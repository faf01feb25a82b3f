"""Lifetime of zero-copy shared-memory receives: a received tensor is a view of the sender's
slot, and the slot stays leased to the receiver for as long as any view of it lives.

Real sockets and real /dev/shm segments: a consumer that keeps a tensor never sees it
overwritten however much follows, a full ring waits for a slot or goes inline (never
reuses a leased one), a replayed reference to a leased slot is refused, and a receiver
closed under live views leaves them readable.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from exegpt.shm_ring import ShmRing
from exegpt.transport import FrameError, TensorMessage, TensorSocket
from tests.common.test_shm_ring import ShmPair, genuine_header, make_pair, numbered


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[ShmPair]:
    yield from make_pair(tmp_path, shm_slot_bytes=64 * 1024, shm_num_slots=2, shm_wait_s=0)


def test_a_kept_tensor_is_never_overwritten_and_its_slot_returns_when_dropped(
    pair: ShmPair,
) -> None:
    pair.sender.send(numbered(0))
    kept = pair.receiver.recv(timeout_ms=5000).tensors["x"][10:20]  # a view of a view
    # Many more messages than slots: one slot stays leased, the other carries each in turn.
    for index in range(1, 30):
        pair.sender.send(numbered(index))
        received = pair.receiver.recv(timeout_ms=5000)
        assert torch.equal(received.tensors["x"], numbered(index).tensors["x"])
        del received
    assert torch.equal(kept, torch.zeros(10))
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (30, 0)

    del kept  # the first slot goes back: both slots carry messages again
    first, second = numbered(30), numbered(31)
    pair.sender.send(first)
    pair.sender.send(second)
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (32, 0)
    assert pair.receiver.recv(timeout_ms=5000).sequence == 30


def test_a_consumer_holding_every_slot_makes_sends_go_inline_without_corruption(
    pair: ShmPair,
) -> None:
    held = []
    for index in range(2):
        pair.sender.send(numbered(index))
        held.append(pair.receiver.recv(timeout_ms=5000))
    for index in range(2, 6):  # the ring is full of leased slots: inline, nothing reused
        pair.sender.send(numbered(index))
        assert pair.receiver.recv(timeout_ms=5000).sequence == index
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (2, 4)
    for index, message in enumerate(held):
        assert torch.equal(message.tensors["x"], numbered(index).tensors["x"])


@pytest.fixture()
def one_waiting_slot(tmp_path: Path) -> Iterator[ShmPair]:
    yield from make_pair(tmp_path, shm_slot_bytes=64 * 1024, shm_num_slots=1, shm_wait_s=30)


def test_a_full_ring_waits_for_the_consumer_to_drop_a_slot(one_waiting_slot: ShmPair) -> None:
    pair = one_waiting_slot
    pair.sender.send(numbered(0))
    first = pair.receiver.recv(timeout_ms=5000)
    sent = threading.Event()

    def send_second() -> None:
        pair.sender.send(numbered(1))  # waits: the only slot is leased
        sent.set()

    sender = threading.Thread(target=send_second)
    sender.start()
    assert not sent.wait(0.3)
    assert torch.equal(first.tensors["x"], numbered(0).tensors["x"])
    del first  # the lease ends: the waiting send takes the slot
    sender.join(30)
    assert sent.is_set()
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (2, 0)
    assert torch.equal(pair.receiver.recv(timeout_ms=5000).tensors["x"], torch.ones(1000))


def test_a_replayed_reference_to_a_leased_slot_is_refused(pair: ShmPair) -> None:
    ring = ShmRing(slot_bytes=8192, num_slots=1)
    try:
        header = genuine_header(ring)
        pair.forge(header)
        kept = pair.receiver.recv(timeout_ms=5000).tensors["x"]
        pair.forge(header)  # the same slot again, while the first view is alive
        with pytest.raises(FrameError, match="still leased"):
            pair.receiver.recv(timeout_ms=5000)
        assert ring.reserve(4096) is None  # still leased: the sender may not reuse it
        del kept
        assert ring.reserve(4096) == 0
    finally:
        ring.close()


def mapped_segments() -> str:
    return Path("/proc/self/maps").read_text()


def test_views_outlive_their_receiver_and_unmap_when_dropped(tmp_path: Path) -> None:
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=64 * 1024, shm_num_slots=2)
    sender.connect(receiver.bind(f"shm+ipc://{tmp_path}/outlive.sock"))
    tensors = {"a": torch.arange(1000.0), "b": torch.full((7, 3), 5, dtype=torch.int32)}
    sender.send(TensorMessage("activations", tensors))
    received = receiver.recv(timeout_ms=5000).tensors
    segment = str(sender.shm_segment)
    receiver.close()  # the mapping stays while the views live
    sender.close()  # unlinks the segment; the receiver's mapping keeps its memory
    context.term()
    assert segment in mapped_segments()
    assert torch.equal(received["a"], tensors["a"])
    assert torch.equal(received["b"], tensors["b"])
    del received
    gc.collect()
    assert segment not in mapped_segments()
