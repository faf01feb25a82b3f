"""Configuration of the profiler service (one dataclass, built in main())."""

from __future__ import annotations

from dataclasses import dataclass, field

from exegpt.security import SecurityConfig


@dataclass(frozen=True)
class ProfilerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    # Where profiles are stored, one <profile_id>.json each; created if missing.
    profile_dir: str = "profiles"
    # Directories under which a StartProfile request may name a checkpoint to load; the
    # embedded default model is always allowed, any other path is refused unread.
    model_roots: tuple[str, ...] = ()
    # Runs that may wait for a busy device (timings taken concurrently are wrong, so one
    # runs at a time); a request beyond this gets RESOURCE_EXHAUSTED. 0: never wait.
    max_queued_per_device: int = 1
    # Limits on a requested grid, so one request cannot ask for hours or all memory.
    max_points_per_axis: int = 64
    max_size_tokens: int = 1 << 17  # batch sizes, sequence lengths, token counts
    max_message_size_bytes: int = 1 << 30
    max_num_repeats: int = 1000
    max_num_warmup: int = 100
    # ListProfiles answers at most this many summaries.
    max_list: int = 1000
    max_message_bytes: int = 4 * 2**20
    ready_file: str | None = None
    grace_period_s: float = 5.0
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if not self.profile_dir:
            raise ValueError("profile_dir must name a directory")
        if self.max_queued_per_device < 0:
            raise ValueError("max_queued_per_device must be >= 0")
        limits = (
            self.max_points_per_axis,
            self.max_size_tokens,
            self.max_message_size_bytes,
            self.max_num_repeats,
            self.max_list,
            self.max_message_bytes,
        )
        if min(limits) < 1 or self.max_num_warmup < 0:
            raise ValueError("the profiler's limits must be positive")
