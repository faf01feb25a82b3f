"""The data plane: tensors over ZeroMQ as a protobuf header plus one raw frame per tensor.

Sends are zero-copy (ZeroMQ takes the tensor's memory directly) and receives wrap the frame
buffers with torch.frombuffer, so a tensor crosses a socket without being copied into Python
objects, and nothing is ever unpickled. Every received header is checked against its frames
before a byte is interpreted.

On one host, loopback TCP or IPC moves a few GB/s against tens for a memcpy, so a socket made
with `same_host=True`, or bound/connected to an `shm+ipc://`, `shm+tcp://` or `shm+inproc://`
address, sends each message's tensors through a slot of its shared-memory ring
(exegpt/shm_ring.py) and ZeroMQ carries only the header naming that slot. A payload larger
than a slot, or a full ring, goes inline as above; so does everything from a plain socket.
Only a same-host socket accepts slot references, and it checks each against the segment.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from exegpt.shm_ring import ShmReader, ShmRefError, ShmRing, SlotRef, aligned_bytes
from exegpt.v1 import transport_pb2

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8")
}
MAX_HEADER_BYTES = 64 * 1024
SHM_SCHEME_PREFIX = "shm+"
DEFAULT_SHM_SLOT_BYTES = 8 * 2**20
DEFAULT_SHM_NUM_SLOTS = 8
# How long a send waits for a slot to free before it goes inline: long enough to ride out a
# receiver's copy of a large payload, short enough that a receiver that has gone costs little.
DEFAULT_SHM_WAIT_S = 0.05


class FrameError(ValueError):
    """A received message does not match its header (refused, never interpreted)."""


@dataclass
class TensorMessage:
    kind: str
    tensors: dict[str, torch.Tensor]
    sequence: int = 0
    trace_context: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class TransportStats:
    """How a socket's messages went: through shared-memory slots or inline over ZeroMQ."""

    sent_shm: int = 0
    sent_inline: int = 0
    received_shm: int = 0
    received_inline: int = 0


def _new_header(message: TensorMessage) -> transport_pb2.FrameHeader:
    return transport_pb2.FrameHeader(
        kind=message.kind,
        sequence=message.sequence,
        trace_context=message.trace_context,
        attributes=message.attributes,
    )


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be sent")
    return dtype_name


def encode(message: TensorMessage) -> list[bytes | memoryview]:
    """Frames for a message: the header, then each tensor's bytes (no copy when contiguous)."""
    header = _new_header(message)
    frames: list[bytes | memoryview] = []
    for name, tensor in message.tensors.items():
        header.tensors.add(name=name, dtype=_dtype_name(name, tensor), shape=list(tensor.shape))
        data = tensor.detach().cpu().contiguous()
        # Reinterpret as bytes without copying (bfloat16 has no numpy equivalent); flattened
        # first because a 0-dim tensor cannot change its element size.
        as_bytes = data.reshape(-1).view(torch.uint8)
        frames.append(memoryview(as_bytes.numpy()) if data.numel() else b"")
    return [header.SerializeToString(), *frames]


def encode_into_ring(
    message: TensorMessage, ring: ShmRing, *, wait_s: float = 0.0
) -> list[bytes] | None:
    """The header-only frame for a message whose tensors now lie in one of the ring's slots.

    None when the message should go inline instead: nothing to carry, larger than a slot, or
    every slot still being read after `wait_s`.
    """
    offsets_bytes: list[int] = []
    payload_bytes = 0
    for tensor in message.tensors.values():
        offsets_bytes.append(payload_bytes)
        payload_bytes += aligned_bytes(tensor.numel() * tensor.element_size())
    slot = ring.reserve(payload_bytes, wait_s=wait_s) if payload_bytes else None
    if slot is None:
        return None
    view = ring.slot_view(slot, payload_bytes)
    header = _new_header(message)
    for (name, tensor), offset in zip(message.tensors.items(), offsets_bytes, strict=True):
        header.tensors.add(
            name=name, dtype=_dtype_name(name, tensor), shape=list(tensor.shape), shm_offset=offset
        )
        _copy_into_slot(view, offset, tensor)
    ref = ring.publish(slot, payload_bytes)
    header.shm.CopyFrom(
        transport_pb2.ShmSlotRef(
            segment=ref.segment, slot=ref.slot, ticket=ref.ticket, payload_bytes=payload_bytes
        )
    )
    return [header.SerializeToString()]


def _copy_into_slot(view: np.ndarray, offset_bytes: int, tensor: torch.Tensor) -> None:
    num_bytes = tensor.numel() * tensor.element_size()
    if num_bytes == 0:
        return
    target = view[offset_bytes : offset_bytes + num_bytes]
    source = tensor.detach()
    if source.device.type == "cpu" and source.is_contiguous():
        # numpy's copy is one plain memcpy on this thread: it keeps the data plane off torch's
        # intra-op pool, which the stage's compute owns (and which stalls on shared cores).
        np.copyto(target, source.reshape(-1).view(torch.uint8).numpy())
        return
    # Strided or on a GPU: one copy straight from the source into the slot's bytes.
    torch.from_numpy(target).view(source.dtype).view(source.shape).copy_(source)


def decode(frames: list[zmq.Frame] | list[bytes], *, shm: ShmReader | None = None) -> TensorMessage:
    """Rebuild a message from frames, validating dtypes, shapes and sizes first.

    A header that names a shared-memory slot is read through `shm` (a same-host socket's
    reader) and refused without one.
    """
    if not frames:
        raise FrameError("empty message")
    header = _parse_header(_buffer(frames[0]))
    if header.HasField("shm"):
        if shm is None:
            raise FrameError("shared-memory reference on a socket that does not accept them")
        if len(frames) != 1:
            raise FrameError(f"shared-memory message with {len(frames) - 1} tensor frames")
        tensors = _tensors_from_slot(header, shm)
    else:
        if len(header.tensors) != len(frames) - 1:
            raise FrameError(f"header lists {len(header.tensors)} tensors, got {len(frames) - 1}")
        tensors = {
            meta.name: _tensor_from_frame(meta, _buffer(frame))
            for meta, frame in zip(header.tensors, frames[1:], strict=True)
        }
    return TensorMessage(
        kind=header.kind,
        tensors=tensors,
        sequence=header.sequence,
        trace_context=dict(header.trace_context),
        attributes=dict(header.attributes),
    )


def _parse_header(raw_header: memoryview) -> transport_pb2.FrameHeader:
    if len(raw_header) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    header = transport_pb2.FrameHeader()
    try:
        header.ParseFromString(bytes(raw_header))
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise FrameError(f"malformed header: {exc}") from None
    return header


def _buffer(frame: zmq.Frame | bytes) -> memoryview:
    return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)


def _checked_meta(meta: transport_pb2.TensorMeta) -> tuple[torch.dtype, list[int], int]:
    """The dtype, shape and byte size a tensor's header entry implies, once they make sense."""
    dtype = _DTYPES.get(meta.dtype)
    if dtype is None:
        raise FrameError(f"tensor {meta.name!r}: unsupported dtype {meta.dtype!r}")
    if any(dim < 0 for dim in meta.shape):
        raise FrameError(f"tensor {meta.name!r}: negative dimension in {list(meta.shape)}")
    numel = 1
    for dim in meta.shape:
        numel *= dim
    return dtype, list(meta.shape), numel * dtype.itemsize


def _tensor_from_frame(meta: transport_pb2.TensorMeta, data: memoryview) -> torch.Tensor:
    dtype, shape, expected = _checked_meta(meta)
    if len(data) != expected:
        raise FrameError(f"tensor {meta.name!r}: {len(data)} bytes, header implies {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # The frame's memory is read-only; torch warns but only reads it. Clone before writing.
    flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


def _tensors_from_slot(
    header: transport_pb2.FrameHeader, reader: ShmReader
) -> dict[str, torch.Tensor]:
    ref = SlotRef(header.shm.segment, header.shm.slot, header.shm.ticket, header.shm.payload_bytes)
    try:
        payload = reader.payload(ref)
    except ShmRefError as exc:
        raise FrameError(f"shared-memory reference refused: {exc}") from None
    try:
        return {meta.name: _tensor_from_slot(meta, payload) for meta in header.tensors}
    finally:
        # The ref was genuine, so the slot goes back to the sender even if a tensor is refused.
        reader.release(ref)


def _tensor_from_slot(meta: transport_pb2.TensorMeta, payload: np.ndarray) -> torch.Tensor:
    dtype, shape, num_bytes = _checked_meta(meta)
    end_bytes = meta.shm_offset + num_bytes
    if meta.shm_offset % dtype.itemsize or end_bytes > len(payload):
        raise FrameError(
            f"tensor {meta.name!r}: bytes {meta.shm_offset}..{end_bytes} outside the "
            f"{len(payload)}-byte slot payload or misaligned"
        )
    if num_bytes == 0:
        return torch.empty(shape, dtype=dtype)
    # Copied out so the slot is free again when recv returns (no shared lifetimes). numpy
    # allocates large buffers on huge pages, which saves most of a fresh buffer's page faults.
    data = np.empty(num_bytes, dtype=np.uint8)
    np.copyto(data, payload[meta.shm_offset : end_bytes])
    return torch.from_numpy(data).view(dtype).view(shape)


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
        frames = None
        if ring is not None:
            frames = encode_into_ring(message, ring, wait_s=self.shm_wait_s)
        if frames is not None:
            self.stats.sent_shm += 1
            self.socket.send_multipart(frames, copy=False)
            return
        self.stats.sent_inline += 1
        self.socket.send_multipart(encode(message), copy=False)

    def recv(self, timeout_ms: int | None = None) -> TensorMessage:
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            raise TimeoutError(f"no message within {timeout_ms} ms")
        frames = self.socket.recv_multipart(copy=False)
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
    host is reached through shared memory, another over TCP."""

    def __init__(self, context: zmq.Context, max_message_bytes: int = 256 * 2**20) -> None:
        self._context = context
        self._max_message_bytes = max_message_bytes
        self._sockets: dict[str, TensorSocket] = {}

    def send(self, addresses: list[str], message: TensorMessage) -> None:
        for address in addresses:
            self._socket(address).send(message)

    def _socket(self, address: str) -> TensorSocket:
        socket = self._sockets.get(address)
        if socket is None:
            zmq_address, _ = split_shm_scheme(address)
            socket = TensorSocket(
                self._context, zmq.PUSH, max_message_bytes=self._max_message_bytes
            )
            # Never block the sender on a dead peer: its messages queue up to the HWM.
            socket.socket.setsockopt(zmq.SNDTIMEO, 5000)
            prefix = SHM_SCHEME_PREFIX if is_same_host(zmq_address) else ""
            socket.connect(prefix + zmq_address)
            self._sockets[address] = socket
        return socket

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close()
        self._sockets.clear()
