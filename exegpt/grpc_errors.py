"""Mapping between gRPC status codes and exegpt's transport-neutral error codes."""

from __future__ import annotations

import grpc

from exegpt.errors import ErrorCode, RequestError

_TO_GRPC: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}
_FROM_GRPC = {v: k for k, v in _TO_GRPC.items()}


def to_grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return _TO_GRPC[code]


def error_from_rpc(error: grpc.RpcError) -> RequestError:
    """A RequestError carrying an RPC failure's code and details."""
    status = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return RequestError(_FROM_GRPC.get(status, ErrorCode.INTERNAL), details or str(status))
