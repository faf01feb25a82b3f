"""The profile file: versioned JSON, validated on load, written atomically.

A profile holds raw measurements (medians with p10/p90 over each grid), exact memory sizes,
and the hardware, software and model it was measured with. `layer_profile.py` turns it into the
query API. Loading checks the format tag, the version and every field's shape, so a
corrupt, truncated or foreign file fails with a message that says what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Self

import pydantic
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, model_validator

FORMAT = "exegpt-profile"
VERSION = 2


class ProfileError(ValueError):
    """A profile file is missing, unreadable, malformed, or for another model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeriesData(_Strict):
    """Timings over increasing sizes: median with the 10th and 90th percentiles."""

    sizes: list[PositiveInt] = Field(min_length=1)
    median_s: list[NonNegativeFloat]
    p10_s: list[NonNegativeFloat]
    p90_s: list[NonNegativeFloat]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        n = len(self.sizes)
        if not len(self.median_s) == len(self.p10_s) == len(self.p90_s) == n:
            raise ValueError(f"sizes, median_s, p10_s and p90_s must all have {n} entries")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:], strict=False)):
            raise ValueError(f"sizes must be strictly increasing, got {self.sizes}")
        if not all(math.isfinite(v) for v in [*self.median_s, *self.p10_s, *self.p90_s]):
            raise ValueError("timings must be finite")
        return self


class RowData(SeriesData):
    batch_size: PositiveInt


class SurfaceData(_Strict):
    rows: list[RowData] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_batches(self) -> Self:
        batches = [row.batch_size for row in self.rows]
        if any(b <= a for a, b in zip(batches, batches[1:], strict=False)):
            raise ValueError(f"row batch sizes must be strictly increasing, got {batches}")
        return self


class ComputeData(_Strict):
    """One TP degree: per-layer times on one rank (seconds); services/profiler/measure/layers.py
    measures them."""

    threads_per_rank: PositiveInt
    encode_attention: SurfaceData  # over (batch, seq_len)
    encode_rest: SeriesData  # over tokens
    cross_kv_write: SeriesData | None = None  # T5: per decoder layer, over encoder tokens
    decode_self_attention: SurfaceData  # over (batch, kv_len)
    decode_cross_attention: SurfaceData | None = None  # T5: over (batch, encoder tokens)
    decode_rest: SeriesData  # over batch size


class FitData(_Strict):
    latency_s: NonNegativeFloat
    bytes_per_s: float | None  # None: no measurable per-byte cost


class CommData(_Strict):
    series: SeriesData  # over message bytes
    fit: FitData


class MemoryData(_Strict):
    """Exact bytes on one device, per TP degree."""

    encode_layer_weight_bytes: dict[PositiveInt, int]
    decode_layer_weight_bytes: dict[PositiveInt, int]
    embedding_weight_bytes: int
    kv_bytes_per_token: dict[PositiveInt, int]
    cross_kv_bytes_per_token: dict[PositiveInt, int]


class ModelData(_Strict):
    name: str
    source: str  # what load_model was given (a name or a checkpoint directory)
    family: Literal["t5", "llama"]
    config_hash: str = Field(min_length=64, max_length=64)
    config: dict[str, Any]
    is_encoder_decoder: bool
    num_encode_layers: PositiveInt
    num_decode_layers: PositiveInt
    hidden_size: PositiveInt
    # The dtype every timing was measured in; a profile written before the field existed was
    # measured in float32. The planner refuses to plan for workers of another dtype.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype_bytes: PositiveInt = 4
    # How the Linears ran (exegpt/models/prepack.py), as serving runs them in this dtype; a
    # profile written before the field existed ran plain ones.
    linear_kernel: Literal["aten", "onednn-packed"] = "aten"
    max_context_tokens: PositiveInt


class HardwareData(_Strict):
    device: str
    device_name: str
    num_cpus: PositiveInt
    platform: str


class SoftwareData(_Strict):
    torch_version: str
    python_version: str
    exegpt_version: str
    torch_threads: PositiveInt
    allocator: str = ""  # malloc settings during the run (exegpt/allocator.py)


class QualityData(_Strict):
    """How undisturbed the measurements were (see services/profiler/measure/contention.py)."""

    num_measurements: int
    num_retries: int  # re-measured because other processes were busy on the CPUs
    num_contended: int  # kept although every attempt was disturbed


class ServingData(_Strict):
    """The serving path's host work beside the forwards (exegpt/serving_overhead.py), fitted
    to a real deployment driven at saturation (services/profiler/serving.py)."""

    step_s: NonNegativeFloat  # per engine step
    token_s: NonNegativeFloat  # per row of a step (one token: sampling, detokenize, stream)
    request_s: NonNegativeFloat  # per request a prefill admits
    num_steps: int  # engine steps the fit saw
    busy_fraction: float = Field(ge=0.0, le=1.0)  # forwards / engine wall time while busy
    method: str  # how it was measured, for the record


class ProfileData(_Strict):
    format: Literal["exegpt-profile"]
    version: Literal[2]
    profile_id: str = Field(min_length=1)
    created_at: str
    grid_name: str
    grid: dict[str, Any]
    profiling_time_s: NonNegativeFloat
    quality: QualityData
    model: ModelData
    hardware: HardwareData
    software: SoftwareData
    tp_degrees: list[PositiveInt] = Field(min_length=1)
    compute: dict[PositiveInt, ComputeData]
    # Whole forwards of the real model at TP 1 (services/profiler/measure/forwards.py), timed at the
    # attention grid's points: the per-forward overhead is what they took beyond the parts.
    prefill_whole: SurfaceData  # prefill (T5: encode and the first decoder step), (B, S)
    decode_whole: SurfaceData  # decode step, (B, kv_len); T5: cross_len = kv_len
    embedding: SeriesData
    lm_head: SeriesData
    allreduce: dict[PositiveInt, CommData]  # TP degrees > 1
    transfer: CommData
    memory: MemoryData
    # Optional: profiles measured without it (or before it existed) add no serving overhead.
    serving: ServingData | None = None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        degrees = self.tp_degrees
        if 1 not in degrees or degrees != sorted(set(degrees)):
            raise ValueError(f"tp_degrees must be increasing and include 1, got {degrees}")
        if sorted(self.compute) != degrees:
            raise ValueError(f"compute has TP degrees {sorted(self.compute)}, expected {degrees}")
        if sorted(self.allreduce) != [d for d in degrees if d > 1]:
            raise ValueError(f"allreduce has TP degrees {sorted(self.allreduce)}")
        memory = self.memory
        for name in (
            "encode_layer_weight_bytes",
            "decode_layer_weight_bytes",
            "kv_bytes_per_token",
            "cross_kv_bytes_per_token",
        ):
            if sorted(getattr(memory, name)) != degrees:
                raise ValueError(f"memory.{name} must have an entry for each TP degree")
        if self.model.is_encoder_decoder and any(
            c.cross_kv_write is None or c.decode_cross_attention is None
            for c in self.compute.values()
        ):
            raise ValueError("an encoder-decoder profile needs cross_kv_write and cross attention")
        return self


def _describe(exc: pydantic.ValidationError, limit: int = 5) -> str:
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_profile(data: object, source: str = "profile") -> ProfileData:
    """Validate decoded JSON as a profile (raises ProfileError)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source} is not a profile: expected a JSON object")
    if data.get("format") != FORMAT:
        raise ProfileError(f"{source} is not an exegpt profile (format {data.get('format')!r})")
    if data.get("version") != VERSION:
        raise ProfileError(
            f"{source} has profile version {data.get('version')!r}; this build reads version "
            f"{VERSION}: measure the model again with `exegpt profile`"
        )
    try:
        return ProfileData.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ProfileError(f"{source} is not a valid profile: {_describe(exc)}") from None


def read_profile(path: str | Path, expected_config_hash: str | None = None) -> ProfileData:
    """Load and validate a profile file; optionally check it was taken for this model."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {source}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"{source} is not valid JSON (corrupt or truncated file?): {exc}"
        ) from None
    profile = parse_profile(data, source)
    if expected_config_hash is not None and profile.model.config_hash != expected_config_hash:
        raise ProfileError(
            f"{source} was measured for model {profile.model.name!r} with config hash "
            f"{profile.model.config_hash[:12]}..., but this model's config hash is "
            f"{expected_config_hash[:12]}...: profile this model instead"
        )
    return profile


def check_writable(path: str | Path) -> Path:
    """Fail early (before profiling) if `path` cannot be written; returns it resolved."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise ProfileError(f"output path {target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise ProfileError(f"cannot write {target}: directory {target.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        raise ProfileError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    return target


def write_profile(profile: ProfileData, path: str | Path) -> Path:
    """Write atomically: a temporary file in the same directory, then a rename."""
    target = check_writable(path)
    text = profile.model_dump_json(indent=1) + "\n"
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
