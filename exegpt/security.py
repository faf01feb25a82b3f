"""Authentication and TLS shared by every service and client.

An API key (`--api-key` or EXEGPT_API_KEY) is a bearer token: HTTP clients send
`Authorization: Bearer KEY`, gRPC clients `authorization: Bearer KEY` metadata. Servers
compare it in constant time; the gRPC health service stays open so probes need no key.

TLS: a server given `--tls-cert/--tls-key` serves TLS; a client given `--tls-ca` connects
with TLS and checks the server against that CA. Internal servers (worker, stage, scheduler,
profiler) given a CA too require client certificates signed by it (mutual TLS); clients
present `--tls-client-cert/--tls-client-key`. The router's public gRPC and HTTP servers never
ask for client certificates: clients there are authenticated by the API key.

Every flag falls back to an environment variable, so `exegpt up` hands them to its children
through the environment and no key shows up in a process list.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

API_KEY_ENV = "EXEGPT_API_KEY"
# flag name -> environment variable it falls back to
_TLS_ENV = {
    "tls_cert": "EXEGPT_TLS_CERT",
    "tls_key": "EXEGPT_TLS_KEY",
    "tls_ca": "EXEGPT_TLS_CA",
    "tls_client_cert": "EXEGPT_TLS_CLIENT_CERT",
    "tls_client_key": "EXEGPT_TLS_CLIENT_KEY",
}
# Methods anyone may call: load balancers and routers probe health without a key.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
UNAUTHENTICATED_MESSAGE = "missing or wrong API key (authorization: Bearer KEY)"


@dataclass(frozen=True)
class SecurityConfig:
    api_key: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("--tls-client-cert and --tls-client-key go together")
        for path in (self.tls_cert, self.tls_key, self.tls_ca, self.tls_client_cert):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")

    @property
    def bearer(self) -> str | None:
        return f"Bearer {self.api_key}" if self.api_key else None

    @property
    def url_scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def environment(self) -> dict[str, str]:
        """The variables that give a child process this configuration."""
        env = {API_KEY_ENV: self.api_key} if self.api_key else {}
        for name, variable in _TLS_ENV.items():
            if (value := getattr(self, name)) is not None:
                env[variable] = str(value)
        return env


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication and TLS (each falls back to EXEGPT_*)")
    group.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Bearer KEY' from clients and send it to other services "
        f"(default: ${API_KEY_ENV}; prefer the variable: flags show in process lists)",
    )
    helps = {
        "tls_cert": "serve TLS with this PEM certificate (chain)",
        "tls_key": "the certificate's PEM private key",
        "tls_ca": "PEM CA that clients check servers against (and internal servers check "
        "client certificates against: mutual TLS)",
        "tls_client_cert": "PEM certificate presented to other services (mutual TLS)",
        "tls_client_key": "its PEM private key",
    }
    for name, variable in _TLS_ENV.items():
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, type=Path, default=None, help=f"{helps[name]} (${variable})")


def security_from_args(args: argparse.Namespace | None = None) -> SecurityConfig:
    """Flags first, then the EXEGPT_* environment (what `exegpt up` sets for its children)."""

    def pick(name: str, variable: str) -> str | None:
        value = getattr(args, name, None) if args is not None else None
        return str(value) if value is not None else os.environ.get(variable) or None

    paths = {
        name: Path(value) if (value := pick(name, variable)) else None
        for name, variable in _TLS_ENV.items()
    }
    return SecurityConfig(api_key=pick("api_key", API_KEY_ENV), **paths)


def key_matches(presented: str | None, expected_bearer: str) -> bool:
    """Constant-time comparison of an Authorization value with 'Bearer KEY'."""
    return hmac.compare_digest((presented or "").encode(), expected_bearer.encode())


# ---- gRPC servers ---------------------------------------------------------------------------


def server_credentials(
    config: SecurityConfig, require_client_cert: bool
) -> grpc.ServerCredentials | None:
    """TLS credentials for a gRPC server, or None to serve plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    chain = [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
    mutual = require_client_cert and config.tls_ca is not None
    root = config.tls_ca.read_bytes() if mutual and config.tls_ca else None
    return grpc.ssl_server_credentials(chain, root, require_client_auth=mutual)


async def _unauthenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _unauthenticated_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # pragma: no cover (an async generator; abort raises)


def _ignore(data: bytes) -> None:
    """An unauthenticated request's bytes are never parsed."""


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unauthenticated, _ignore, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unauthenticated_stream, _ignore, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_unauthenticated, _ignore, serializer)
    return grpc.stream_stream_rpc_method_handler(_unauthenticated_stream, _ignore, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Calls without `authorization: Bearer KEY` get UNAUTHENTICATED (health checks pass)."""

    def __init__(self, api_key: str) -> None:
        self._bearer = f"Bearer {api_key}"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        presented = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value
        if key_matches(presented, self._bearer):
            return handler
        return _refusal(handler)


# ---- gRPC clients ---------------------------------------------------------------------------


def channel_credentials(config: SecurityConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials checking servers against --tls-ca, or None for plaintext."""
    if config.tls_ca is None:
        return None
    cert = key = None
    if config.tls_client_cert is not None and config.tls_client_key is not None:
        cert, key = config.tls_client_cert.read_bytes(), config.tls_client_key.read_bytes()
    return grpc.ssl_channel_credentials(config.tls_ca.read_bytes(), key, cert)


_CallDetails = collections.namedtuple(
    "_CallDetails",
    ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
)


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, bearer: str) -> None:
        self._bearer = bearer

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), ("authorization", self._bearer)]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _aio_details(details: grpc.aio.ClientCallDetails, bearer: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", bearer))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioBearerUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, bearer: str) -> None:
        self._bearer = bearer

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._bearer), request)


class _AioBearerUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, bearer: str) -> None:
        self._bearer = bearer

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._bearer), request)


class _AioBearerStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, bearer: str) -> None:
        self._bearer = bearer

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._bearer), requests)


class _AioBearerStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, bearer: str) -> None:
        self._bearer = bearer

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._bearer), requests)


def sync_channel(
    target: str, config: SecurityConfig, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking channel that speaks TLS when a CA is configured and sends the API key."""
    credentials = channel_credentials(config)
    channel = (
        grpc.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(target, options=options)
    )
    if config.bearer is None:
        return channel
    return grpc.intercept_channel(channel, _SyncBearer(config.bearer))


def aio_channel(
    target: str, config: SecurityConfig, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel that speaks TLS when a CA is configured and sends the API key."""
    interceptors: list[Any] = []
    if (bearer := config.bearer) is not None:
        interceptors = [
            _AioBearerUnaryUnary(bearer),
            _AioBearerUnaryStream(bearer),
            _AioBearerStreamUnary(bearer),
            _AioBearerStreamStream(bearer),
        ]
    credentials = channel_credentials(config)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options, interceptors=interceptors)


# ---- HTTP -----------------------------------------------------------------------------------


def server_ssl_context(config: SecurityConfig) -> ssl.SSLContext | None:
    """The gateway's TLS context (no client certificates asked), or None for plain HTTP."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
