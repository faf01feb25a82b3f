"""The measurement grid: which sizes the profiler times, and how carefully.

Sizes are log-spaced: costs change by orders of magnitude across them and the profile
interpolates between points in log-log space. Encode attention grows with B x S^2 and
decode attention with B x L, so points past `max_score_elements` / `max_kv_tokens` are
skipped (their memory would dwarf the model), as are encode points of more than
`max_encode_tokens` tokens (each runs whole layers); the profile extrapolates there from
the batch sizes that were measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

KIB = 1024
MIB = 1024 * KIB

# Timed samples of at least 10 ms, as long as the whole forwards the validation compares with.
SAMPLE_S = 0.01


def log_spaced(start: int, stop: int, factor: int = 2) -> tuple[int, ...]:
    """start, start * factor, ... up to and including `stop` (if it falls on the sequence)."""
    if start < 1 or factor < 2:
        raise ValueError(f"log_spaced needs start >= 1 and factor >= 2, got {start}, {factor}")
    values = []
    value = start
    while value <= stop:
        values.append(value)
        value *= factor
    return tuple(values)


@dataclass(frozen=True)
class ProfileGrid:
    batch_sizes: tuple[int, ...]  # attention: sequences per batch
    seq_lens_tokens: tuple[int, ...]  # encode attention: prompt length
    kv_lens_tokens: tuple[int, ...]  # decode attention: cached tokens (self) / encoder tokens
    num_tokens: tuple[int, ...]  # rest of layer, embedding, LM head: tokens in the batch
    message_bytes: tuple[int, ...]  # all-reduce and pipeline hand-off sizes
    num_warmup: int = 2
    num_repeats: int = 5
    # Every point is measured once per round, the rounds one after the other, and the
    # rounds' medians combined: a slow spell of the machine then disturbs one round of many
    # points instead of every sample of a few.
    num_rounds: int = 1
    # One measurement stops repeating after this long (keeping at least 3 samples).
    max_measure_s: float = 1.0
    # Each timed sample repeats short work until it lasts this long (timing.Timer).
    min_sample_s: float = SAMPLE_S
    # CPU: evict the last-level cache before every timed repeat of a layer measurement, as
    # the rest of a forward would (timing.CacheFlusher). None: only for models whose weights
    # exceed the cache (a model that fits stays cached from one forward to the next).
    flush_cache: bool | None = None
    # Encode attention points with B x H x S^2 above this are skipped.
    max_score_elements: int = 2**24
    # Decode attention points with B x L above this are skipped.
    max_kv_tokens: int = 2**15
    # Encode attention points with B x S above this are skipped.
    max_encode_tokens: int = 2**14

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "seq_lens_tokens", "kv_lens_tokens", "num_tokens"):
            _check_sizes(name, getattr(self, name), minimum=1)
        _check_sizes("message_bytes", self.message_bytes, minimum=4)
        if not self.max_measure_s > 0:
            raise ValueError(f"max_measure_s must be positive, got {self.max_measure_s}")
        if not 0 <= self.min_sample_s <= self.max_measure_s:
            raise ValueError(
                f"min_sample_s must be between 0 and max_measure_s ({self.max_measure_s}), "
                f"got {self.min_sample_s}"
            )
        if self.num_warmup < 0 or self.num_repeats < 1 or self.num_rounds < 1:
            raise ValueError(
                f"the grid needs num_warmup >= 0, num_repeats >= 1 and num_rounds >= 1, got "
                f"{self.num_warmup}, {self.num_repeats} and {self.num_rounds}"
            )
        if min(self.max_score_elements, self.max_kv_tokens, self.max_encode_tokens) < 1:
            raise ValueError(
                "max_score_elements, max_kv_tokens and max_encode_tokens must be positive"
            )

    def to_dict(self) -> dict[str, Any]:
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileGrid:
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})

    def for_context(self, max_context_tokens: int) -> ProfileGrid:
        """This grid with the sequence lengths past the model's context dropped."""
        seq = tuple(s for s in self.seq_lens_tokens if s <= max_context_tokens)
        kv = tuple(s for s in self.kv_lens_tokens if s <= max_context_tokens)
        if not seq or not kv:
            raise ValueError(
                f"every sequence length of the grid exceeds the model's context of "
                f"{max_context_tokens} tokens"
            )
        return replace(self, seq_lens_tokens=seq, kv_lens_tokens=kv)

    def encode_points(self, num_heads: int) -> list[tuple[int, int]]:
        """(batch, seq_len) points of the encode-attention grid within the memory cap."""
        shortest = self.seq_lens_tokens[0]  # kept for every batch size: each row needs a point
        return [
            (batch, seq)
            for batch in self.batch_sizes
            for seq in self.seq_lens_tokens
            if seq == shortest
            or (
                batch * num_heads * seq * seq <= self.max_score_elements
                and batch * seq <= self.max_encode_tokens
            )
        ]

    def decode_points(self) -> list[tuple[int, int]]:
        """(batch, kv_len) points of the decode-attention grid within the memory cap."""
        shortest = self.kv_lens_tokens[0]
        return [
            (batch, kv)
            for batch in self.batch_sizes
            for kv in self.kv_lens_tokens
            if batch * kv <= self.max_kv_tokens or kv == shortest
        ]


def _check_sizes(name: str, values: Sequence[int], minimum: int) -> None:
    if not values:
        raise ValueError(f"grid {name} is empty")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise ValueError(f"grid {name} must hold integers, got {list(values)}")
    if min(values) < minimum:
        raise ValueError(f"grid {name} must be >= {minimum}, got {list(values)}")
    if list(values) != sorted(set(values)):
        raise ValueError(f"grid {name} must be strictly increasing, got {list(values)}")


QUICK = ProfileGrid(
    # 1 -> 2 matters: one token or sequence takes matrix-vector kernels, two take GEMMs and
    # cost markedly more, a step no log-log line between 1 and 4 follows. Batch 32 and KV
    # 512 bring the larger decode steps (batch x KV up to 32k tokens) inside the grid.
    # Encode attention stops at 2**23 scores (the default model: batch 2 at 1024 tokens);
    # batch 4 at 1024 alone took a sixth of the run.
    batch_sizes=(1, 2, 4, 16, 32, 64),
    seq_lens_tokens=(16, 128, 1024),
    kv_lens_tokens=(1, 16, 128, 512, 1024),
    num_tokens=(1, 2, 4, 16, 64, 256, 1024, 4096),
    message_bytes=(1 * KIB, 64 * KIB, 4 * MIB),
    num_warmup=1,
    num_repeats=3,
    num_rounds=3,
    max_measure_s=0.4,
    max_score_elements=2**23,
    max_encode_tokens=4096,
)

FULL = ProfileGrid(
    batch_sizes=log_spaced(1, 64),
    seq_lens_tokens=log_spaced(8, 1024),
    kv_lens_tokens=(1, *log_spaced(8, 1024)),
    num_tokens=log_spaced(1, 16384),
    message_bytes=log_spaced(256, 64 * MIB, factor=4),
    num_warmup=1,
    num_repeats=5,
    num_rounds=3,
    max_measure_s=0.5,
)

PRESETS: dict[str, ProfileGrid] = {"quick": QUICK, "full": FULL}


def preset(name: str) -> ProfileGrid:
    if name not in PRESETS:
        raise ValueError(f"unknown grid {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]


# The size axes, each a tuple of strictly increasing positive integers.
AXES = ("batch_sizes", "seq_lens_tokens", "kv_lens_tokens", "num_tokens", "message_bytes")
CUSTOM = "custom"


def build_grid(base: str | None, overrides: dict[str, Any]) -> tuple[str, ProfileGrid]:
    """(name, grid): the preset `base` with some fields replaced, or (base None or "") a
    custom grid, which must give every size axis. Raises ValueError saying what is wrong."""
    unknown = sorted(set(overrides) - set(ProfileGrid.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown grid fields {unknown}")
    fields = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in overrides.items()}
    if base:
        grid = replace(preset(base), **fields)
        return (base if not fields else f"{base}-{CUSTOM}"), grid
    for axis in AXES:
        if axis not in fields:
            raise ValueError(f"grid {axis} is empty: a custom grid gives every size axis")
    return CUSTOM, ProfileGrid(**fields)
