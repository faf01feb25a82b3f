"""The data plane: tensors over ZeroMQ as a protobuf header plus one raw frame per tensor.

Sends are zero-copy (ZeroMQ takes the tensor's memory directly) and receives wrap the frame
buffers with torch.frombuffer, so a tensor crosses a socket without being copied into Python
objects, and nothing is ever unpickled. Every received header is checked against its frames
before a byte is interpreted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import zmq

from exegpt.v1 import transport_pb2

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8")
}
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


def encode(message: TensorMessage) -> list[bytes | memoryview]:
    """Frames for a message: the header, then each tensor's bytes (no copy when contiguous)."""
    header = transport_pb2.FrameHeader(
        kind=message.kind,
        sequence=message.sequence,
        trace_context=message.trace_context,
        attributes=message.attributes,
    )
    frames: list[bytes | memoryview] = []
    for name, tensor in message.tensors.items():
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if dtype_name not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be sent")
        header.tensors.add(name=name, dtype=dtype_name, shape=list(tensor.shape))
        data = tensor.detach().cpu().contiguous()
        # Reinterpret as bytes without copying (bfloat16 has no numpy equivalent).
        frames.append(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
    return [header.SerializeToString(), *frames]


def decode(frames: list[zmq.Frame] | list[bytes]) -> TensorMessage:
    """Rebuild a message from frames, validating dtypes, shapes and sizes first."""
    if not frames:
        raise FrameError("empty message")
    raw_header = _buffer(frames[0])
    if len(raw_header) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    header = transport_pb2.FrameHeader()
    try:
        header.ParseFromString(bytes(raw_header))
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise FrameError(f"malformed header: {exc}") from None
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


def _buffer(frame: zmq.Frame | bytes) -> memoryview:
    return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)


def _tensor_from_frame(meta: transport_pb2.TensorMeta, data: memoryview) -> torch.Tensor:
    dtype = _DTYPES.get(meta.dtype)
    if dtype is None:
        raise FrameError(f"tensor {meta.name!r}: unsupported dtype {meta.dtype!r}")
    if any(dim < 0 for dim in meta.shape):
        raise FrameError(f"tensor {meta.name!r}: negative dimension in {list(meta.shape)}")
    numel = 1
    for dim in meta.shape:
        numel *= dim
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise FrameError(f"tensor {meta.name!r}: {len(data)} bytes, header implies {expected}")
    if numel == 0:
        return torch.empty(list(meta.shape), dtype=dtype)
    # The frame's memory is read-only; torch warns but only reads it. Clone before writing.
    flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).view(list(meta.shape))


class TensorSocket:
    """A ZeroMQ socket that sends and receives TensorMessages, with a size limit."""

    def __init__(
        self,
        context: zmq.Context,
        socket_type: int,
        *,
        max_message_bytes: int = 256 * 2**20,
    ) -> None:
        self.socket = context.socket(socket_type)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.socket.setsockopt(zmq.LINGER, 0)

    def bind(self, address: str) -> str:
        """Bind (tcp://127.0.0.1:0 picks a port) and return the resolved address."""
        if address.endswith(":0"):
            port = self.socket.bind_to_random_port(address.rsplit(":", 1)[0])
            return f"{address.rsplit(':', 1)[0]}:{port}"
        self.socket.bind(address)
        return address

    def connect(self, address: str) -> None:
        self.socket.connect(address)

    def send(self, message: TensorMessage, extra: Mapping[str, str] | None = None) -> None:
        if extra:
            message.attributes.update(extra)
        self.socket.send_multipart(encode(message), copy=False)

    def recv(self, timeout_ms: int | None = None) -> TensorMessage:
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            raise TimeoutError(f"no message within {timeout_ms} ms")
        return decode(self.socket.recv_multipart(copy=False))

    def close(self) -> None:
        self.socket.close(linger=0)
