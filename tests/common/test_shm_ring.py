"""Same-host hand-off through the sender's shared-memory ring (exegpt/shm_ring.py).

Real sockets and real /dev/shm segments throughout: slot reuse and wrap-around, fallback to
inline frames, refusal of forged or stale slot references (the receiver keeps serving), no
segment left behind, and a hand-off between two real processes.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zmq

from exegpt.shm_ring import ShmRing
from exegpt.shm_sweep import SEGMENT_PREFIX, SHM_DIR, leftover_segments
from exegpt.transport import FrameError, TensorMessage, TensorSocket
from exegpt.v1 import transport_pb2
from tests.common.test_transport import assert_same_tensors, every_dtype_tensors

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ShmPair:
    context: zmq.Context
    address: str
    sender: TensorSocket
    receiver: TensorSocket

    def forge(self, header: transport_pb2.FrameHeader, *extra_frames: bytes) -> None:
        """Send a hand-made message from a raw socket, as a buggy or hostile peer would."""
        raw = self.context.socket(zmq.PUSH)
        raw.setsockopt(zmq.LINGER, 1000)
        raw.connect(self.address.removeprefix("shm+"))
        raw.send_multipart([header.SerializeToString(), *extra_frames])
        raw.close()


def make_pair(tmp_path: Path, **sender_options: float) -> Iterator[ShmPair]:
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    address = receiver.bind(f"shm+ipc://{tmp_path}/data.sock")
    sender = TensorSocket(context, zmq.PUSH, **sender_options)  # type: ignore[arg-type]
    sender.connect(address)
    yield ShmPair(context, address, sender, receiver)
    sender.close()
    receiver.close()
    context.term()


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[ShmPair]:
    yield from make_pair(tmp_path, shm_slot_bytes=64 * 1024, shm_num_slots=3, shm_wait_s=0)


def numbered(index: int) -> TensorMessage:
    return TensorMessage("activations", {"x": torch.full((1000,), float(index))}, sequence=index)


def test_ring_wraps_around_many_times_and_reuses_every_slot(pair: ShmPair) -> None:
    # Bursts of as many messages as slots, received after each burst: every slot is written,
    # read, released and written again, 40 times over three slots.
    for burst in range(0, 120, 3):
        for index in range(burst, burst + 3):
            pair.sender.send(numbered(index))
        for index in range(burst, burst + 3):
            received = pair.receiver.recv(timeout_ms=5000)
            assert received.sequence == index
            assert torch.equal(received.tensors["x"], numbered(index).tensors["x"])
        del received  # its tensors view the last slot: dropping them hands it back
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (120, 0)
    assert pair.receiver.stats.received_shm == 120


def test_full_ring_falls_back_inline_without_overwriting_unread_slots(pair: ShmPair) -> None:
    for index in range(5):  # three slots: the last two find none free
        pair.sender.send(numbered(index))
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (3, 2)
    for index in range(5):
        received = pair.receiver.recv(timeout_ms=5000)
        assert received.sequence == index
        assert torch.equal(received.tensors["x"], numbered(index).tensors["x"])
    pair.sender.send(numbered(5))  # read slots are free again
    assert pair.sender.stats.sent_shm == 4
    assert pair.receiver.recv(timeout_ms=5000).sequence == 5


def test_payload_larger_than_a_slot_goes_inline(pair: ShmPair) -> None:
    big = {"x": torch.randn(64 * 1024)}  # 256 KiB against 64 KiB slots
    pair.sender.send(TensorMessage("big", big))
    pair.sender.send(numbered(1))
    assert_same_tensors(pair.receiver.recv(timeout_ms=5000).tensors, big)
    assert pair.receiver.recv(timeout_ms=5000).sequence == 1
    assert (pair.sender.stats.sent_shm, pair.sender.stats.sent_inline) == (1, 1)
    assert (pair.receiver.stats.received_shm, pair.receiver.stats.received_inline) == (1, 1)


def test_large_tensors_of_every_dtype_go_through_a_ring_sized_for_them(tmp_path: Path) -> None:
    for pair in make_pair(tmp_path, shm_slot_bytes=40 * 2**20, shm_num_slots=2):
        tensors = {
            "hidden": torch.randn(2048, 4096),  # 32 MiB
            "half": torch.randn(1024, 1024).to(torch.bfloat16),
            **every_dtype_tensors(),
        }
        for _ in range(3):
            pair.sender.send(TensorMessage("activations", tensors))
            assert_same_tensors(pair.receiver.recv(timeout_ms=10_000).tensors, tensors)
        assert pair.sender.stats.sent_shm == 3


def genuine_header(ring: ShmRing, payload_bytes: int = 4096) -> transport_pb2.FrameHeader:
    """A header naming a slot the ring really published, with one float32 tensor in it."""
    slot = ring.reserve(payload_bytes)
    assert slot is not None
    ref = ring.publish(slot, payload_bytes)
    header = transport_pb2.FrameHeader(kind="forged")
    header.tensors.add(name="x", dtype="float32", shape=[payload_bytes // 4])
    header.shm.CopyFrom(
        transport_pb2.ShmSlotRef(
            segment=ref.segment, slot=ref.slot, ticket=ref.ticket, payload_bytes=payload_bytes
        )
    )
    return header


def refused(pair: ShmPair, header: transport_pb2.FrameHeader, match: str) -> None:
    pair.forge(header)
    with pytest.raises(FrameError, match=match):
        pair.receiver.recv(timeout_ms=5000)


def test_forged_and_stale_slot_references_are_refused_and_the_receiver_keeps_serving(
    pair: ShmPair,
) -> None:
    ring = ShmRing(slot_bytes=8192, num_slots=16)  # refused refs keep their slots
    try:
        for name in ("../../etc/passwd", "other-shm-1-0123456789abcdef", f"{SEGMENT_PREFIX}x/y"):
            header = genuine_header(ring)
            header.shm.segment = name
            refused(pair, header, "not a ring segment")
        header = genuine_header(ring)
        header.shm.segment = f"{SEGMENT_PREFIX}{os.getpid()}-{'0' * 16}"
        refused(pair, header, "cannot be opened")

        header = genuine_header(ring)
        header.shm.slot = 16
        refused(pair, header, "out of range")
        header = genuine_header(ring)
        header.shm.ticket += 1
        refused(pair, header, "ticket")
        header = genuine_header(ring)
        header.shm.payload_bytes = 2 * 8192
        refused(pair, header, "exceeds")
        header = genuine_header(ring)
        header.tensors[0].shm_offset = 64  # the tensor's last bytes fall outside the payload
        refused(pair, header, "outside")
        header = genuine_header(ring)
        header.tensors[0].shape[0] = 4096  # 16 KiB claimed in a 4 KiB payload
        refused(pair, header, "outside")

        header = genuine_header(ring)
        pair.forge(header)
        assert pair.receiver.recv(timeout_ms=5000).tensors["x"].numel() == 1024
        refused(pair, header, "already read")  # a replayed reference
        pair.forge(genuine_header(ring), b"extra frame")
        with pytest.raises(FrameError, match="tensor frames"):
            pair.receiver.recv(timeout_ms=5000)
    finally:
        ring.close()
    # Every refusal left the receiver working, and a genuine sender still gets through.
    pair.sender.send(numbered(7))
    received = pair.receiver.recv(timeout_ms=5000)
    assert received.sequence == 7 and torch.equal(received.tensors["x"], numbered(7).tensors["x"])


def test_a_layout_remembered_from_an_accepted_message_is_checked_against_each_payload(
    pair: ShmPair,
) -> None:
    # The receiver caches each tensor entry's checked layout; the same entry naming a slot
    # whose payload is too small for it must still be refused, and its slot handed back.
    ring = ShmRing(slot_bytes=8192, num_slots=2)
    try:
        pair.forge(genuine_header(ring))  # "x": 1024 float32 at offset 0, 4 KiB payload
        assert pair.receiver.recv(timeout_ms=5000).tensors["x"].numel() == 1024
        header = genuine_header(ring, payload_bytes=2048)
        header.tensors[0].shape[0] = 1024  # the accepted entry, in half the bytes
        refused(pair, header, "outside")
        gc.collect()
        reserved = []
        for _ in range(2):  # both slots came back: the read one and the refused one
            slot = ring.reserve(4096)
            assert slot is not None
            ring.publish(slot, 4096)
            reserved.append(slot)
        assert sorted(reserved) == [0, 1]
    finally:
        ring.close()


def test_a_remembered_tensor_is_read_wherever_the_next_message_places_it(pair: ShmPair) -> None:
    # As in a decode step: the slots list grows every step, moving the tensors after it. The
    # receiver remembers each entry's checked layout, but reads and checks its offset anew.
    for step in range(1, 4):
        message = TensorMessage(
            "decode",
            {
                "read_slots": torch.arange(16 * step, dtype=torch.int64),
                "tokens": torch.arange(32, dtype=torch.int64) + step,
                "scale": torch.full((2, 3), float(step), dtype=torch.float32),
            },
        )
        pair.sender.send(message)
        assert_same_tensors(pair.receiver.recv(timeout_ms=5000).tensors, message.tensors)
    # All three through shared memory, so "tokens" has a remembered layout for the forgeries.
    assert (pair.receiver.stats.received_shm, pair.receiver.stats.received_inline) == (3, 0)
    ring = ShmRing(slot_bytes=8192, num_slots=2)
    try:
        header = genuine_header(ring)
        header.tensors[0].name = "tokens"  # the remembered entry: 32 int64, now misplaced
        header.tensors[0].dtype, header.tensors[0].shape[0] = "int64", 32
        header.tensors[0].shm_offset = 4  # inside the payload, but not on an int64
        refused(pair, header, "misaligned")
        header = genuine_header(ring)
        header.tensors[0].name = "tokens"
        header.tensors[0].dtype, header.tensors[0].shape[0] = "int64", 32
        header.tensors[0].shm_offset = 4096 - 128  # its last bytes past the payload
        refused(pair, header, "outside")
    finally:
        ring.close()


def test_a_refused_tensor_still_returns_its_genuine_slot_to_the_sender(pair: ShmPair) -> None:
    ring = ShmRing(slot_bytes=8192, num_slots=1)
    try:
        header = genuine_header(ring)
        header.tensors[0].dtype = "complex64"
        refused(pair, header, "unsupported dtype")
        assert ring.reserve(4096) == 0  # released, so the only slot is free again
    finally:
        ring.close()


def test_files_that_are_not_rings_are_refused(pair: ShmPair) -> None:
    ring = ShmRing(slot_bytes=8192, num_slots=1)
    impostor = SHM_DIR / f"{SEGMENT_PREFIX}{os.getpid()}-{'f' * 16}"
    impostor.write_bytes(b"\0" * 3 * 8192)  # the right name, but no ring's magic or layout
    try:
        header = genuine_header(ring)
        header.shm.segment = impostor.name
        refused(pair, header, "layout")
    finally:
        impostor.unlink()
        ring.close()


def test_plain_sockets_refuse_slot_references(tmp_path: Path) -> None:
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)  # not same-host: no shared memory read
    address = receiver.bind(f"ipc://{tmp_path}/plain.sock")
    ring = ShmRing(slot_bytes=8192, num_slots=1)
    raw = context.socket(zmq.PUSH)
    try:
        raw.connect(address)
        raw.send(genuine_header(ring).SerializeToString())
        with pytest.raises(FrameError, match="does not accept"):
            receiver.recv(timeout_ms=5000)
    finally:
        raw.close(linger=0)
        ring.close()
        receiver.close()
        context.term()


def test_receivers_apply_their_size_limit_to_slots(tmp_path: Path) -> None:
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL, max_message_bytes=1024)
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=8192, shm_num_slots=1)
    try:
        sender.connect(receiver.bind(f"shm+ipc://{tmp_path}/limit.sock"))
        sender.send(TensorMessage("big", {"x": torch.zeros(1024)}))  # 4 KiB
        assert sender.stats.sent_shm == 1
        with pytest.raises(FrameError, match="exceeds"):
            receiver.recv(timeout_ms=5000)
    finally:
        sender.close()
        receiver.close()
        context.term()


def test_closing_or_dropping_a_sender_removes_its_segment(pair: ShmPair) -> None:
    pair.sender.send(numbered(0))
    pair.receiver.recv(timeout_ms=5000)
    segment = SHM_DIR / str(pair.sender.shm_segment)
    assert segment.exists()
    pair.sender.close()
    assert not segment.exists()

    dropped = ShmRing(slot_bytes=4096, num_slots=1)
    path = dropped.path
    assert path.exists()
    del dropped
    gc.collect()
    assert not path.exists()


SENDER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import zmq
    from exegpt.transport import TensorMessage, TensorSocket
    from tests.common.test_transport import every_dtype_tensors

    context = zmq.Context()
    sender = TensorSocket(context, zmq.PUSH, shm_slot_bytes=8 * 2**20, shm_num_slots=2)
    sender.connect(sys.argv[1])
    sender.send(TensorMessage("dtypes", every_dtype_tensors()))
    generator = torch.Generator().manual_seed(11)
    sender.send(TensorMessage("large", {"hidden": torch.randn(1024, 1536, generator=generator)}))
    for index in range(30):
        sender.send(TensorMessage("count", {"x": torch.full((4096,), float(index))}))
    print(sender.shm_segment, sender.stats.sent_shm, sender.stats.sent_inline, flush=True)
    sys.stdin.read()  # stay (with the ring) until the receiver has read everything
    sender.close()
    """
)


def test_hand_off_between_two_processes_leaves_no_segment_behind(tmp_path: Path) -> None:
    context = zmq.Context()
    receiver = TensorSocket(context, zmq.PULL)
    address = receiver.bind(f"shm+ipc://{tmp_path}/procs.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", SENDER_SCRIPT, address],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert_same_tensors(receiver.recv(timeout_ms=30_000).tensors, every_dtype_tensors())
        generator = torch.Generator().manual_seed(11)
        expected = torch.randn(1024, 1536, generator=generator)
        assert torch.equal(receiver.recv(timeout_ms=10_000).tensors["hidden"], expected)
        for index in range(30):
            received = receiver.recv(timeout_ms=10_000)
            assert torch.equal(received.tensors["x"], torch.full((4096,), float(index)))
        assert child.stdout is not None
        segment, sent_shm, sent_inline = child.stdout.readline().split()
        # The ring has two slots and the receiver read in parallel: most went through slots.
        assert int(sent_shm) + int(sent_inline) == 32 and int(sent_shm) >= 2
        assert receiver.stats.received_shm == int(sent_shm)
        assert (SHM_DIR / segment).exists()
        child.communicate(timeout=30)
        assert child.returncode == 0
        assert not (SHM_DIR / segment).exists()
        assert leftover_segments(child.pid) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        receiver.close()
        context.term()
