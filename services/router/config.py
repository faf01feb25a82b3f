"""Configuration of the router service and its HTTP gateway (built in main())."""

from __future__ import annotations

from dataclasses import dataclass, field

from exegpt.security import SecurityConfig
from services.router.policies import RouterPolicy


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[str, ...]
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    policy: RouterPolicy = RouterPolicy.TOKEN_AWARE
    health_check_interval_s: float = 1.0
    # A request waits at most this long for a healthy replica before UNAVAILABLE.
    replica_wait_s: float = 10.0
    # Caps every request's deadline, a longer one set by a gRPC client included.
    request_timeout_s: float = 600.0
    # A replica with open streams and no progress on any of them for this long is wedged:
    # its streams are cancelled (retried elsewhere before their first token). A frozen or
    # dead process fails its health checks within seconds; this backstop is for one that
    # answers them yet streams nothing. It must outlast the longest legitimate step: one
    # saturated prefill of 32 long prompts takes over 10 s on a 2-core CPU.
    stall_timeout_s: float = 120.0
    max_message_bytes: int = 4 * 2**20
    max_body_bytes: int = 1 * 2**20
    # HTTP: a connection that has not sent a whole request head within this (first request)
    # or sits idle this long between requests is closed (slowloris); a body that has not
    # arrived within http_body_timeout_s gets 408.
    http_idle_timeout_s: float = 15.0
    http_body_timeout_s: float = 30.0
    ready_file: str | None = None
    grace_period_s: float = 5.0
    # API key and TLS of the public ports (gateway, gRPC) and of the calls to the replicas.
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("the router needs at least one replica address")
        timeouts = (
            self.request_timeout_s,
            self.stall_timeout_s,
            self.health_check_interval_s,
            self.http_idle_timeout_s,
            self.http_body_timeout_s,
        )
        if not all(value > 0 for value in timeouts):
            raise ValueError("timeouts and the health check interval must be positive")
