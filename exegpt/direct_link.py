"""Same-host direct links: a data-plane message over a Unix stream socket, no ZeroMQ threads.

Over ZeroMQ, each hand-off wakes three threads besides the sender's: its IO thread, the
receiver's IO thread and the receiver itself. On one host a same-host socket also listens on
a Unix stream socket in Linux's abstract namespace, named after its ZeroMQ address, and a
same-host sender writes straight into it: the receiving thread is the only one woken. The
name is derived from the address, so "the transport is chosen by the addresses" still holds:
a sender that cannot reach the name (another host, another network namespace, an older peer)
uses ZeroMQ as before. Both ends check that the other runs as the same user.

Wire format, native-endian (both ends are on one host), one message after another:
  preamble   u32 magic, u32 header bytes, u32 frame count, u32 reserved
  lengths    u64 per frame
  header     the FrameHeader protobuf (exegpt/frames.py), then each frame's bytes
A message's sizes are checked against the receiver's limits before anything is allocated; a
stream that breaks its framing cannot be resynchronised, so that connection is closed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence

from exegpt.frames import MAX_HEADER_BYTES, FrameError

logger = logging.getLogger(__name__)

_MAGIC = 0x45584431  # "EXD1"
_PREAMBLE = struct.Struct("=4I")
_LENGTH = struct.Struct("=Q")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
MAX_FRAMES = 1024
# Messages a sender queues behind a partly written one before a send waits (then drops).
MAX_PENDING = 64
# A blocked write (a receiver that stopped reading) or a stalled read mid-message gives up
# after this long: the link is closed rather than left hanging.
IO_TIMEOUT_S = 5.0
# After a failed (re)connect, sends are dropped without trying again for this long.
RECONNECT_PAUSE_S = 1.0


class LinkClosed(ConnectionError):
    """The peer closed the link (or died) between messages."""


def link_name(zmq_address: str) -> bytes:
    """The abstract Unix socket name of a same-host socket bound to `zmq_address`."""
    digest = hashlib.sha256(zmq_address.encode()).hexdigest()[:32]
    return b"\0exegpt-direct-" + digest.encode()


def _check_same_user(sock: socket.socket) -> None:
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _, uid, _ = _PEERCRED.unpack(credentials)
    if uid != os.geteuid():
        raise PermissionError(f"direct-link peer runs as uid {uid}, not this user's")


class DirectSender:
    """The sending end: one stream connection to a receiver's link name.

    A send never blocks on the receiver, so two processes sending to each other cannot
    deadlock: it writes what the socket takes at once (all of a header-only message), and a
    flusher thread, started on first need, writes the rest in order while later messages
    queue behind it, up to MAX_PENDING of them. A message to a peer that has gone, or that
    stopped reading for IO_TIMEOUT_S, is dropped and counted, as ZeroMQ drops what it
    queued for a peer that never comes back; a later send, after a pause, reconnects.
    """

    def __init__(self, name: bytes, sock: socket.socket) -> None:
        self.name = name
        self._sock: socket.socket | None = sock
        self._pending: deque[list[memoryview]] = deque()
        self._changed = threading.Condition()
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._retry_at_s = 0.0
        self.dropped = 0

    @classmethod
    def connect(cls, zmq_address: str) -> DirectSender | None:
        """A sender linked to the socket bound at `zmq_address`, or None if it has no link."""
        name = link_name(zmq_address)
        sock = _connected(name)
        return cls(name, sock) if sock is not None else None

    def send(self, frames: Sequence[bytes | memoryview]) -> bool:
        """Write (or queue) one message: the header, then tensor frames. False if dropped."""
        lengths = [len(frame) if isinstance(frame, bytes) else frame.nbytes for frame in frames]
        head = _PREAMBLE.pack(_MAGIC, lengths[0], len(frames) - 1, 0) + b"".join(
            _LENGTH.pack(n) for n in lengths[1:]
        )
        buffers = [head, *frames]
        with self._changed:
            sock = self._live_socket()
            if sock is None or not self._room_to_queue():
                self.dropped += 1
                return False
            if self._pending:  # in order, behind what the flusher is still writing
                self._pending.append([memoryview(b).cast("B") for b in buffers])
                self._changed.notify_all()
                return True
            try:
                sent = sock.sendmsg(buffers)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lose(f"{exc}")
                self.dropped += 1
                return False
            rest = _unsent(buffers, sent)
            if rest:
                self._pending.append(rest)
                self._start_flusher()
                self._changed.notify_all()
            return True

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._disconnect()
            self._changed.notify_all()

    def _room_to_queue(self) -> bool:
        deadline_s = time.monotonic() + IO_TIMEOUT_S
        while len(self._pending) >= MAX_PENDING and self._sock is not None:
            if not self._changed.wait(max(0.0, deadline_s - time.monotonic())):
                self._lose("the receiver stopped reading")
        return self._sock is not None

    def _live_socket(self) -> socket.socket | None:
        if self._sock is None and not self._closed and time.monotonic() >= self._retry_at_s:
            self._sock = _connected(self.name)
            if self._sock is None:
                self._retry_at_s = time.monotonic() + RECONNECT_PAUSE_S
        return self._sock

    def _lose(self, reason: str) -> None:
        """Drop the connection and what is queued on it (called with the lock held)."""
        logger.warning("direct link lost (%s); %d queued message(s) dropped", reason,
                       len(self._pending))  # fmt: skip
        self.dropped += len(self._pending)
        self._disconnect()
        self._retry_at_s = time.monotonic() + RECONNECT_PAUSE_S
        self._changed.notify_all()

    def _disconnect(self) -> None:
        self._pending.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush, name="direct-link", daemon=True)
            self._flusher.start()

    def _flush(self) -> None:
        """Write the queued messages in order, each once the socket takes more bytes."""
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                views, sock = self._pending[0], self._sock
            try:
                assert sock is not None
                _write_when_ready(sock, views)
            except (OSError, AssertionError) as exc:
                with self._changed:
                    if self._sock is sock and sock is not None:
                        self._lose(f"{exc}")
                continue
            with self._changed:
                if self._pending and self._pending[0] is views:
                    self._pending.popleft()
                    self._changed.notify_all()


def _connected(name: bytes) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(name)
        _check_same_user(sock)
    except (OSError, PermissionError):
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def _unsent(buffers: Sequence[bytes | memoryview], sent: int) -> list[memoryview]:
    """The parts of `buffers` past the first `sent` bytes, as byte views."""
    rest = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        rest.append(view[sent:])
        sent = 0
    return rest


def _write_when_ready(sock: socket.socket, views: list[memoryview]) -> None:
    """Write every view, waiting up to IO_TIMEOUT_S each time the socket takes nothing."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    while views:
        if not poller.poll(IO_TIMEOUT_S * 1000):
            raise TimeoutError("the receiver stopped reading")
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:
            continue
        views[:] = _unsent(views, sent)


class DirectListener:
    """The receiving end: accepts same-user connections on a link name, reads whole messages."""

    def __init__(self, zmq_address: str) -> None:
        self.name = link_name(zmq_address)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.name)
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.connections: dict[int, socket.socket] = {}

    @classmethod
    def bind(cls, zmq_address: str) -> DirectListener | None:
        """A listener for a socket bound at `zmq_address`, or None where none can be made."""
        try:
            return cls(zmq_address)
        except OSError as exc:  # not Linux, or the name is taken: senders use ZeroMQ
            logger.info("no direct link for %s: %s", zmq_address, exc)
            return None

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept_all(self) -> None:
        """Take every pending connection from a process of this user; refuse the rest."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                _check_same_user(conn)
            except PermissionError as exc:
                logger.warning("refused a direct link: %s", exc)
                conn.close()
                continue
            conn.settimeout(IO_TIMEOUT_S)
            self.connections[conn.fileno()] = conn

    def read(self, fd: int, max_message_bytes: int) -> list[bytes | memoryview]:
        """One whole message from connection `fd`: the header, then its frames.

        Raises LinkClosed when the peer closed between messages, FrameError when the stream
        broke its framing (the connection is closed in both cases).
        """
        conn = self.connections[fd]
        try:
            return _read_message(conn, max_message_bytes)
        except (FrameError, LinkClosed, OSError) as exc:
            self.drop(fd)
            if isinstance(exc, OSError) and not isinstance(exc, LinkClosed):
                raise FrameError(f"direct link broke mid-message: {exc}") from None
            raise

    def drop(self, fd: int) -> None:
        conn = self.connections.pop(fd, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for fd in list(self.connections):
            self.drop(fd)
        self.sock.close()


def _read_message(conn: socket.socket, max_message_bytes: int) -> list[bytes | memoryview]:
    preamble = _read_exact(conn, _PREAMBLE.size, at_boundary=True)
    magic, header_bytes, num_frames, _ = _PREAMBLE.unpack(preamble)
    if magic != _MAGIC:
        raise FrameError("direct link: not a message preamble")
    if header_bytes > MAX_HEADER_BYTES or num_frames > MAX_FRAMES:
        raise FrameError(f"direct link: {header_bytes}-byte header, {num_frames} frames")
    lengths_and_header = _read_exact(conn, num_frames * _LENGTH.size + header_bytes)
    lengths = [
        _LENGTH.unpack_from(lengths_and_header, index * _LENGTH.size)[0]
        for index in range(num_frames)
    ]
    total_bytes = sum(lengths)
    if header_bytes + total_bytes > max_message_bytes:
        raise FrameError(
            f"direct link: message of {header_bytes + total_bytes} bytes exceeds "
            f"{max_message_bytes}"
        )
    header = bytes(memoryview(lengths_and_header)[num_frames * _LENGTH.size :])
    if not num_frames:
        return [header]
    payload = memoryview(_read_exact(conn, total_bytes))
    frames: list[bytes | memoryview] = [header]
    start = 0
    for length in lengths:
        frames.append(payload[start : start + length])
        start += length
    return frames


def _read_exact(conn: socket.socket, num_bytes: int, *, at_boundary: bool = False) -> bytearray:
    buffer = bytearray(num_bytes)
    view = memoryview(buffer)
    got = 0
    while got < num_bytes:
        count = conn.recv_into(view[got:])
        if count == 0:
            if at_boundary and got == 0:
                raise LinkClosed("peer closed the direct link")
            raise FrameError(f"direct link closed mid-message ({got} of {num_bytes} bytes)")
        got += count
    return buffer
