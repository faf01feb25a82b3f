"""Data-plane frames: a TensorMessage as a protobuf header plus its tensors' raw bytes.

Inline, the bytes follow the header as one ZeroMQ frame per tensor: sends hand ZeroMQ the
tensor's memory and receives wrap the frame buffers with torch.frombuffer, so nothing is
copied into Python objects and nothing is ever unpickled. On one host the bytes may instead
lie in one slot of the sender's shared-memory ring (exegpt/shm_ring.py) and the header names
that slot; the receiver's tensors are then views of the slot, which goes back to the sender
when the last of them is garbage collected. Every received header is checked against its
frames, or its slot, before a byte is interpreted.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq

from exegpt.shm_ring import (
    ALIGN_BYTES,
    ShmReader,
    ShmRefError,
    ShmRing,
    SlotRef,
    aligned_bytes,
)
from exegpt.v1 import transport_pb2

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8")
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
MAX_HEADER_BYTES = 64 * 1024


class FrameError(ValueError):
    """A received message does not match its header (refused, never interpreted)."""


@dataclass
class TensorMessage:
    kind: str
    tensors: dict[str, torch.Tensor]
    sequence: int = 0
    trace_context: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)


def _new_header(message: TensorMessage) -> transport_pb2.FrameHeader:
    return transport_pb2.FrameHeader(
        kind=message.kind,
        sequence=message.sequence,
        trace_context=message.trace_context,
        attributes=message.attributes,
    )


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
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


def encode_into_ring(message: TensorMessage, ring: ShmRing, *, wait_s: float = 0.0) -> bytes | None:
    """The header for a message whose tensors now lie in one of the ring's slots.

    None when the message should go inline instead: nothing to carry, larger than a slot, or
    every slot still leased after `wait_s`. A step carries a dozen small tensors, so the
    per-tensor work is kept to a cached header entry and one memcpy.
    """
    entries: list[tuple[str, torch.Tensor, int, int]] = []
    payload_bytes = 0
    for name, tensor in message.tensors.items():
        num_bytes = tensor.nbytes
        entries.append((name, tensor, payload_bytes, num_bytes))
        payload_bytes += aligned_bytes(num_bytes)
    slot = ring.reserve(payload_bytes, wait_s=wait_s) if payload_bytes else None
    if slot is None:
        return None
    address = ring.slot_address(slot)
    metas = []
    for name, tensor, offset, num_bytes in entries:
        metas.append(_meta_field(name, tensor, offset))
        if not num_bytes:
            continue
        if tensor.is_cpu and tensor.is_contiguous():
            # One plain memcpy on this thread, with no array or tensor made per copy, and off
            # torch's intra-op pool, which the stage's compute owns. In bounds: the slot was
            # reserved for these tensors' aligned sizes.
            ctypes.memmove(address + offset, tensor.data_ptr(), num_bytes)
        else:
            _copy_strided_into_slot(ring, slot, offset, tensor)
    ref = ring.publish(slot, payload_bytes)
    header = _new_header(message)
    shm = header.shm
    shm.segment, shm.slot, shm.ticket = ref.segment, ref.slot, ref.ticket
    shm.payload_bytes = payload_bytes
    # Protobuf fields may come in any order and a repeated field's entries simply follow one
    # another, so the tensors' entries are appended, already serialised.
    return header.SerializeToString() + b"".join(metas)


# FrameHeader.tensors (field 3, length-delimited) entries less their offset, by (name, dtype,
# shape): a sender's steps repeat the same few tensors, and building an entry costs more than
# the tensor's copy. The offset stays out of the key because a decode step's read_slots grow
# every step, which moves every tensor after them; it is appended per message (field 4).
_META_BODIES: dict[tuple[str, torch.dtype, tuple[int, ...]], bytes] = {}
_MAX_META_BODIES = 4096
_TENSORS_TAG = bytes([3 << 3 | 2])
_SHM_OFFSET_TAG = bytes([4 << 3])  # TensorMeta.shm_offset, a varint


def _meta_field(name: str, tensor: torch.Tensor, offset: int) -> bytes:
    key = (name, tensor.dtype, tensor.shape)
    body = _META_BODIES.get(key)
    if body is None:
        body = transport_pb2.TensorMeta(
            name=name, dtype=_dtype_name(name, tensor), shape=tensor.shape
        ).SerializeToString()
        if len(_META_BODIES) >= _MAX_META_BODIES:
            _META_BODIES.clear()
        _META_BODIES[key] = body
    return _field_at(body, offset)


# Whole entries by (body, offset): a steady step repeats both, so its entries cost a lookup.
# A growing slot list moves the offsets after it and misses here, paying the few µs of the
# build; a plain dict keyed by offset alone measured no better (benchmarks/frame_cost.py).
@functools.lru_cache(maxsize=_MAX_META_BODIES)
def _field_at(body: bytes, offset: int) -> bytes:
    """The whole header entry: `body` with its offset (proto3 leaves a zero out), framed."""
    if offset:
        body += _SHM_OFFSET_TAG + _varint(offset)
    return _TENSORS_TAG + _varint(len(body)) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _copy_strided_into_slot(
    ring: ShmRing, slot: int, offset_bytes: int, tensor: torch.Tensor
) -> None:
    """Copy a strided or GPU tensor straight from its source into the slot's bytes."""
    end_bytes = offset_bytes + tensor.nbytes
    target = torch.from_numpy(ring.slot_view(slot, end_bytes)[offset_bytes:])
    target.view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())


def decode(frames: Sequence[zmq.Frame | bytes], *, shm: ShmReader | None = None) -> TensorMessage:
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


def _parse_header(raw_header: memoryview | bytes) -> transport_pb2.FrameHeader:
    if len(raw_header) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    header = transport_pb2.FrameHeader()
    try:
        header.ParseFromString(bytes(raw_header))
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise FrameError(f"malformed header: {exc}") from None
    return header


def _buffer(frame: zmq.Frame | bytes) -> memoryview | bytes:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def _checked_meta(meta: transport_pb2.TensorMeta) -> tuple[torch.dtype, list[int], int]:
    """The dtype, shape and byte size a tensor's header entry implies, once they make sense."""
    dtype = _DTYPES.get(meta.dtype)
    if dtype is None:
        raise FrameError(f"tensor {meta.name!r}: unsupported dtype {meta.dtype!r}")
    shape = list(meta.shape)
    if shape and min(shape) < 0:
        raise FrameError(f"tensor {meta.name!r}: negative dimension in {shape}")
    # A zero-size tensor may still name dimensions whose strides overflow torch's int64.
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 2**63:
        raise FrameError(f"tensor {meta.name!r}: shape {shape} is too large to address")
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _tensor_from_frame(meta: transport_pb2.TensorMeta, data: memoryview | bytes) -> torch.Tensor:
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
    """The message's tensors as views of its slot, each checked to lie inside the payload.

    The slot stays leased while any of them lives; a refused message hands it straight back.
    """
    shm = header.shm
    ref = SlotRef(shm.segment, shm.slot, shm.ticket, shm.payload_bytes)
    try:
        reader.check(ref)
    except ShmRefError as exc:
        raise FrameError(f"shared-memory reference refused: {exc}") from None
    try:
        if ref.payload_bytes % ALIGN_BYTES:
            raise FrameError(f"slot payload of {ref.payload_bytes} bytes is not whole lines")
        layouts = [_slot_layout(meta, ref.payload_bytes) for meta in header.tensors]
    except FrameError:
        reader.release(ref)  # the ref was genuine: the slot goes back to the sender
        raise
    if not any(layout.num_bytes for layout, _ in layouts):
        reader.release(ref)
        return {layout.name: torch.empty(layout.shape, dtype=layout.dtype) for layout, _ in layouts}
    # Every tensor's storage holds the lease; the lease ends when the last of them is freed.
    # One typed view of the whole payload per dtype, then one strided view per tensor: a
    # third of the cost of a frombuffer per tensor (payloads are whole cache lines).
    payload = torch.frombuffer(reader.lease(ref), dtype=torch.uint8)
    typed: dict[torch.dtype, torch.Tensor] = {}
    tensors = {}
    for layout, start in layouts:
        if not layout.num_bytes:
            tensors[layout.name] = torch.empty(layout.shape, dtype=layout.dtype)
            continue
        whole = typed.get(layout.dtype)
        if whole is None:
            whole = typed[layout.dtype] = payload.view(layout.dtype)
        tensors[layout.name] = whole.as_strided(layout.shape, layout.strides, start)
    return tensors


@dataclass(frozen=True)
class _SlotLayout:
    """A tensor's checked header entry, apart from where in the slot it lies."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # contiguous, in elements
    num_bytes: int


# Checked layouts by their header entry less its offset: a sender's steps repeat the same few
# tensors, and checking one (dtype, sizes, strides) cost more than making its view. The
# offset stays out of the key because a decode step's read_slots grow every step, which moves
# every tensor after them; it is checked per message. Only entries of a plain size are kept,
# so that a peer's odd headers cannot make the cache large.
_SLOT_LAYOUTS: dict[tuple[str, str, tuple[int, ...]], _SlotLayout] = {}
_MAX_SLOT_LAYOUTS = 1024
_MAX_CACHED_NAME = 128
_MAX_CACHED_DIMS = 8


def _slot_layout(meta: transport_pb2.TensorMeta, payload_bytes: int) -> tuple[_SlotLayout, int]:
    """A tensor's layout and its start (in elements of its dtype) in a slot, once it fits the
    payload (FrameError otherwise)."""
    shape = tuple(meta.shape)
    key = (meta.name, meta.dtype, shape)
    layout = _SLOT_LAYOUTS.get(key)
    if layout is None:
        layout = _checked_slot_layout(meta)
        if len(meta.name) <= _MAX_CACHED_NAME and len(shape) <= _MAX_CACHED_DIMS:
            if len(_SLOT_LAYOUTS) >= _MAX_SLOT_LAYOUTS:
                _SLOT_LAYOUTS.clear()
            _SLOT_LAYOUTS[key] = layout
    offset = meta.shm_offset
    start, misaligned = divmod(offset, layout.dtype.itemsize)
    if misaligned:
        raise FrameError(f"tensor {meta.name!r}: offset {offset} misaligned for {layout.dtype}")
    if offset + layout.num_bytes > payload_bytes:
        raise FrameError(
            f"tensor {meta.name!r}: bytes {offset}..{offset + layout.num_bytes} outside the "
            f"{payload_bytes}-byte slot payload"
        )
    return layout, start


def _checked_slot_layout(meta: transport_pb2.TensorMeta) -> _SlotLayout:
    dtype, shape, num_bytes = _checked_meta(meta)
    strides = [1] * len(shape)
    for dim in range(len(shape) - 1, 0, -1):
        strides[dim - 1] = strides[dim] * shape[dim]
    return _SlotLayout(meta.name, dtype, tuple(shape), tuple(strides), num_bytes)
