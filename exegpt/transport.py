"""The data plane's sockets: TensorMessages over ZeroMQ, framed by exegpt/frames.py.

A message is a protobuf header plus one raw frame per tensor, sent and received without
copies into Python objects, never pickled, and checked against its header on receipt.

On one host, loopback TCP or IPC moves a few GB/s against tens for a memcpy, so a socket made
with `same_host=True`, or bound/connected to an `shm+ipc://`, `shm+tcp://` or `shm+inproc://`
address, sends each message's tensors through a slot of its shared-memory ring
(exegpt/shm_ring.py) and ZeroMQ carries only the header naming that slot. The receiver's
tensors are views of that slot, which goes back to the sender when the last of them is
garbage collected: a consumer that keeps a message keeps its slot. A payload larger than a
slot, or a ring still full after `shm_wait_s`, goes inline; so does everything from a plain
socket. Only a same-host socket accepts slot references, and it checks each against the
segment.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import zmq

from exegpt.frames import FrameError, TensorMessage, decode, encode, encode_into_ring
from exegpt.shm_ring import ShmReader, ShmRing

__all__ = [
    "FrameError",
    "PushFanout",
    "TensorMessage",
    "TensorSocket",
    "TransportStats",
    "decode",
    "encode",
    "is_same_host",
    "split_shm_scheme",
]

logger = logging.getLogger(__name__)

SHM_SCHEME_PREFIX = "shm+"
DEFAULT_SHM_SLOT_BYTES = 8 * 2**20
DEFAULT_SHM_NUM_SLOTS = 8
# How long a send waits for a slot to free before it goes inline: long enough to ride out a
# receiver's copy of a large payload, short enough that a receiver that has gone costs little.
DEFAULT_SHM_WAIT_S = 0.05
# A stage sends to a handful of addresses per load (next stage's TP ranks, the engine); the
# bound only stops peers from piling up when routes change and nothing calls `retain`.
DEFAULT_MAX_PEERS = 16


@dataclass
class TransportStats:
    """How a socket's messages went: through shared-memory slots or inline over ZeroMQ."""

    sent_shm: int = 0
    sent_inline: int = 0
    received_shm: int = 0
    received_inline: int = 0


def split_shm_scheme(address: str) -> tuple[str, bool]:
    """('ipc://x', True) for 'shm+ipc://x'; other addresses unchanged with False."""
    if address.startswith(SHM_SCHEME_PREFIX):
        return address.removeprefix(SHM_SCHEME_PREFIX), True
    return address, False


def is_same_host(address: str) -> bool:
    """Whether a ZeroMQ address can only lead to this machine (ipc, inproc, a local IP)."""
    address, _ = split_shm_scheme(address)
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    return _is_local_host(rest.rsplit(":", 1)[0].strip("[]"))


def _is_local_host(host: str) -> bool:
    try:
        infos = stdlib_socket.getaddrinfo(host, None, type=stdlib_socket.SOCK_DGRAM)
    except (stdlib_socket.gaierror, UnicodeError):
        return False
    for family, kind, _, _, sockaddr in infos:
        # Binding succeeds only to an address of one of this machine's interfaces.
        with stdlib_socket.socket(family, kind) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


class TensorSocket:
    """A ZeroMQ socket that sends and receives TensorMessages, with a size limit.

    `same_host=True` (or an `shm+` address) makes sends go through a shared-memory ring of
    `shm_num_slots` slots of `shm_slot_bytes`, created on the first send (a send waits up to
    `shm_wait_s` for a free slot, then goes inline), and lets receives accept slot
    references. Every peer of such a socket must be on this host.
    """

    def __init__(
        self,
        context: zmq.Context,
        socket_type: int,
        *,
        max_message_bytes: int = 256 * 2**20,
        same_host: bool = False,
        shm_slot_bytes: int = DEFAULT_SHM_SLOT_BYTES,
        shm_num_slots: int = DEFAULT_SHM_NUM_SLOTS,
        shm_wait_s: float = DEFAULT_SHM_WAIT_S,
    ) -> None:
        self.socket = context.socket(socket_type)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.same_host = same_host
        self.stats = TransportStats()
        self.shm_slot_bytes = shm_slot_bytes
        self.shm_num_slots = shm_num_slots
        self.shm_wait_s = shm_wait_s
        self._ring: ShmRing | None = None
        self._ring_unavailable = False
        self._reader = ShmReader(max_payload_bytes=max_message_bytes)

    @property
    def shm_segment(self) -> str | None:
        """The file name of this socket's ring under /dev/shm, once a send created it."""
        return self._ring.name if self._ring is not None else None

    def bind(self, address: str) -> str:
        """Bind (tcp://127.0.0.1:0 picks a port) and return the resolved address."""
        zmq_address, shm = split_shm_scheme(address)
        self.same_host = self.same_host or shm
        prefix = SHM_SCHEME_PREFIX if shm else ""
        if zmq_address.endswith(":0"):
            port = self.socket.bind_to_random_port(zmq_address.rsplit(":", 1)[0])
            return f"{prefix}{zmq_address.rsplit(':', 1)[0]}:{port}"
        self.socket.bind(zmq_address)
        return address

    def connect(self, address: str) -> None:
        zmq_address, shm = split_shm_scheme(address)
        if shm and not is_same_host(zmq_address):
            raise ValueError(f"{address}: shared memory needs a peer on this host")
        self.same_host = self.same_host or shm
        self.socket.connect(zmq_address)

    def send(self, message: TensorMessage, extra: Mapping[str, str] | None = None) -> None:
        if extra:
            message.attributes.update(extra)
        ring = self._ring_for_send()
        header = None
        if ring is not None:
            header = encode_into_ring(message, ring, wait_s=self.shm_wait_s)
        if header is not None:
            self.stats.sent_shm += 1
            self.socket.send(header)  # a few hundred bytes: copying beats a zero-copy hand-off
            return
        self.stats.sent_inline += 1
        self.socket.send_multipart(encode(message), copy=False)

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message is ready to `recv` within `timeout_ms` (0: look, do not wait)."""
        return bool(self.socket.poll(timeout_ms))

    def recv(self, timeout_ms: int | None = None) -> TensorMessage:
        """The next message. A shared-memory message's tensors are views of its slot: keep
        them only as long as needed (the sender has `shm_num_slots` slots in all)."""
        if timeout_ms is not None and not self.poll(timeout_ms):
            raise TimeoutError(f"no message within {timeout_ms} ms")
        # The header as a frame: its `more` flag (which pyzmq reads inside recv) spares the
        # Python-level getsockopt(RCVMORE) call, ~12 µs of a woken receiver's CPU (receive and
        # check ~19-21 µs instead of ~33 µs); the header's bytes are copied once, by the parse.
        header = self.socket.recv(copy=False)
        frames: list[zmq.Frame | bytes] = [header]
        if header.more:
            frames.extend(self.socket.recv_multipart(copy=False))  # tensor frames: no copy
        message = decode(frames, shm=self._reader if self.same_host else None)
        if len(frames) == 1 and message.tensors:
            self.stats.received_shm += 1
        else:
            self.stats.received_inline += 1
        return message

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._reader.close()
        self.socket.close(linger=0)

    def _ring_for_send(self) -> ShmRing | None:
        if not self.same_host or self._ring_unavailable:
            return self._ring
        if self._ring is None:
            try:
                self._ring = ShmRing(slot_bytes=self.shm_slot_bytes, num_slots=self.shm_num_slots)
            except OSError as exc:
                # No /dev/shm, or too little of it: the data plane still works, only slower.
                logger.warning("shared-memory ring unavailable, sending inline: %s", exc)
                self._ring_unavailable = True
        return self._ring


class PushFanout:
    """PUSH sockets to a set of peers, made on first use: a message goes to every address of
    a hop (each tensor-parallel rank of the next stage gets the same input). A peer on this
    host is reached through shared memory, another over TCP.

    Each same-host peer costs a socket and a ring of shared memory, so the set is kept small:
    `retain` closes the peers a new route no longer names, and beyond `max_peers` the least
    recently used is closed. Closing drops what is still queued to that peer and unlinks its
    ring; a receiver that already mapped the ring keeps reading its leased slots, and a
    header that arrives after the unlink is refused as a bad frame. Thread-safe.
    """

    def __init__(
        self,
        context: zmq.Context,
        max_message_bytes: int = 256 * 2**20,
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        shm_slot_bytes: int = DEFAULT_SHM_SLOT_BYTES,
    ) -> None:
        if max_peers < 1:
            raise ValueError("a fanout needs room for at least one peer")
        self._context = context
        self._max_message_bytes = max_message_bytes
        self._max_peers = max_peers
        self._shm_slot_bytes = shm_slot_bytes
        self._sockets: OrderedDict[str, TensorSocket] = OrderedDict()  # least recent first
        self._lock = threading.Lock()

    @property
    def peers(self) -> list[str]:
        """The addresses with an open socket, least recently used first."""
        with self._lock:
            return list(self._sockets)

    def shm_segments(self) -> dict[str, str]:
        """Each peer's ring segment name under /dev/shm, for the peers that have one."""
        with self._lock:
            return {
                address: socket.shm_segment
                for address, socket in self._sockets.items()
                if socket.shm_segment is not None
            }

    def send(self, addresses: list[str], message: TensorMessage) -> None:
        with self._lock:
            for address in addresses:
                self._socket(address).send(message)

    def retain(self, addresses: Iterable[str]) -> list[str]:
        """Close every peer not in `addresses` (a new load's routes); returns those closed."""
        keep = set(addresses)
        with self._lock:
            gone = [address for address in self._sockets if address not in keep]
            for address in gone:
                self._sockets.pop(address).close()
        if gone:
            logger.info("closed %d data-plane peer(s) no longer routed to", len(gone))
        return gone

    def _socket(self, address: str) -> TensorSocket:
        socket = self._sockets.get(address)
        if socket is not None:
            self._sockets.move_to_end(address)
            return socket
        zmq_address, _ = split_shm_scheme(address)
        socket = TensorSocket(
            self._context,
            zmq.PUSH,
            max_message_bytes=self._max_message_bytes,
            shm_slot_bytes=self._shm_slot_bytes,
        )
        # Never block the sender on a dead peer: its messages queue up to the HWM.
        socket.socket.setsockopt(zmq.SNDTIMEO, 5000)
        prefix = SHM_SCHEME_PREFIX if is_same_host(zmq_address) else ""
        socket.connect(prefix + zmq_address)
        self._sockets[address] = socket
        while len(self._sockets) > self._max_peers:
            evicted, oldest = self._sockets.popitem(last=False)
            logger.warning("more than %d data-plane peers: closed %s", self._max_peers, evicted)
            oldest.close()
        return socket

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets.values():
                socket.close()
            self._sockets.clear()
