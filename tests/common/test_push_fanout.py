"""PushFanout keeps its peers few: real ZeroMQ sockets and real /dev/shm ring segments.

A same-host peer costs a socket and a ring segment. `retain` closes the peers a new route
no longer names and unlinks their rings; beyond `max_peers` the least recently used peer
is closed. The peers that stay keep receiving, and a receiver's tensors from a closed peer
stay readable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zmq

from exegpt.shm_sweep import SHM_DIR
from exegpt.transport import PushFanout, TensorMessage, TensorSocket


@dataclass
class Peers:
    context: zmq.Context
    fanout: PushFanout
    receivers: dict[str, TensorSocket]

    def send_and_check(self, name: str, value: float) -> torch.Tensor:
        """Send one message to peer `name` and return what it received (through its ring)."""
        address = self.address(name)
        self.fanout.send([address], message(value))
        received = self.receivers[address].recv(timeout_ms=5000).tensors["x"]
        assert torch.equal(received, torch.full((256,), value))
        return received

    def address(self, name: str) -> str:
        return next(a for a in self.receivers if a.endswith(f"/{name}.sock"))

    def segment(self, name: str) -> Path:
        return SHM_DIR / self.fanout.shm_segments()[self.address(name)]


def message(value: float) -> TensorMessage:
    return TensorMessage("activations", {"x": torch.full((256,), value)})


def make_peers(tmp_path: Path, names: str, max_peers: int) -> Iterator[Peers]:
    context = zmq.Context()
    fanout = PushFanout(context, max_peers=max_peers, shm_slot_bytes=64 * 1024)
    receivers = {}
    for name in names:
        receiver = TensorSocket(context, zmq.PULL, same_host=True)
        receivers[receiver.bind(f"ipc://{tmp_path}/{name}.sock")] = receiver
    peers = Peers(context, fanout, receivers)
    yield peers
    fanout.close()
    for receiver in receivers.values():
        receiver.close()
    context.term()


@pytest.fixture()
def three(tmp_path: Path) -> Iterator[Peers]:
    yield from make_peers(tmp_path, "abc", max_peers=16)


@pytest.fixture()
def bounded(tmp_path: Path) -> Iterator[Peers]:
    yield from make_peers(tmp_path, "abcd", max_peers=2)


def test_retain_closes_unrouted_peers_and_unlinks_their_rings(three: Peers) -> None:
    for index, name in enumerate("abc"):
        three.send_and_check(name, index)
    rings = {name: three.segment(name) for name in "abc"}
    assert all(ring.exists() for ring in rings.values())
    assert len(set(rings.values())) == 3  # one ring per peer

    closed = three.fanout.retain([three.address("a"), three.address("c")])

    assert closed == [three.address("b")]
    assert not rings["b"].exists()
    assert rings["a"].exists() and rings["c"].exists()
    assert sorted(three.fanout.peers) == sorted([three.address("a"), three.address("c")])
    three.send_and_check("a", 10)  # the retained peers still receive, through the same rings
    three.send_and_check("c", 12)
    assert three.segment("a") == rings["a"] and three.segment("c") == rings["c"]
    assert three.receivers[three.address("a")].stats.received_shm == 2


def test_retain_of_nothing_closes_every_peer_and_a_later_send_reopens(three: Peers) -> None:
    three.send_and_check("a", 1)
    ring = three.segment("a")
    assert three.fanout.retain([]) == [three.address("a")]
    assert not ring.exists()
    assert three.fanout.peers == []
    three.send_and_check("a", 2)  # a route that comes back gets a fresh socket and ring
    assert three.segment("a") != ring


def test_beyond_the_bound_the_least_recently_used_peer_is_closed(bounded: Peers) -> None:
    bounded.send_and_check("a", 1)
    bounded.send_and_check("b", 2)
    ring_a, ring_b = bounded.segment("a"), bounded.segment("b")
    bounded.send_and_check("a", 3)  # a is now the more recently used

    bounded.send_and_check("c", 4)

    assert not ring_b.exists()  # b, not a, was least recently used
    assert ring_a.exists()
    assert sorted(bounded.fanout.peers) == sorted([bounded.address("a"), bounded.address("c")])
    ring_c = bounded.segment("c")
    bounded.send_and_check("d", 5)
    assert not ring_a.exists() and ring_c.exists()
    assert len(bounded.fanout.peers) == 2
    bounded.send_and_check("c", 6)
    bounded.send_and_check("d", 7)


def test_a_receiver_keeps_its_tensors_from_a_closed_peer(three: Peers) -> None:
    kept = three.send_and_check("b", 7)  # a view of the sender's slot
    ring = three.segment("b")
    three.fanout.retain([])
    assert not ring.exists()
    assert torch.equal(kept, torch.full((256,), 7.0))  # the receiver's mapping holds on


def test_a_fanout_needs_room_for_a_peer() -> None:
    context = zmq.Context()
    with pytest.raises(ValueError, match="at least one peer"):
        PushFanout(context, max_peers=0)
    context.term()
