"""One profiling run: check the request, measure everything, assemble the profile.

Used by both the CLI and the service; no grpc here. Every check that can fail on bad
input runs before the first measurement, so a bad request costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

import exegpt
from exegpt.allocator import configure_allocator
from exegpt.dtypes import DEFAULT_DTYPE, dtype_name, resolve_dtype
from exegpt.models.config import ModelConfig
from exegpt.models.defaults import DEFAULT_MODEL_NAME, default_model_config
from exegpt.models.loader import LoadedModel, ModelNotFoundError, load_model
from exegpt.models.tensor_parallel import check_tp_degree, feasible_tp_degrees
from exegpt.profile.format import FORMAT, VERSION, ProfileData
from services.profiler.measure.comm import (
    fit_latency_bandwidth,
    measure_allreduce,
    measure_transfer,
)
from services.profiler.measure.grid import ProfileGrid, preset
from services.profiler.measure.layers import LayerMeasurements, LayerProfiler
from services.profiler.measure.memory import memory_data
from services.profiler.measure.timing import Series

logger = logging.getLogger(__name__)


class ProfilingCancelled(Exception):
    """Raised from a progress callback to stop a run between measurements."""


@dataclass(frozen=True)
class ProfileRequest:
    model: str = DEFAULT_MODEL_NAME
    device: str = "cpu"
    dtype: str = DEFAULT_DTYPE  # or auto: the profile records what it resolved to
    grid_name: str = "quick"
    grid: ProfileGrid | None = None  # None: the preset named grid_name
    tp_degrees: tuple[int, ...] | None = None  # None: every feasible degree

    def resolved_grid(self) -> ProfileGrid:
        return self.grid if self.grid is not None else preset(self.grid_name)


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    num_done: int
    num_total: int
    elapsed_s: float


ProgressCallback = Callable[[ProgressEvent], None]


def check_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from exc
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA")
        if (torch_device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPUs")
    elif torch_device.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda[:N]'")
    return torch_device


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to profile in; `auto` is resolved for `device` as a worker there would."""
    return resolve_dtype(name, str(device))


def max_tp_degree(device: torch.device) -> int:
    """Ranks the machine can hold: GPUs, or CPU cores (each rank needs one)."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def resolve_tp_degrees(
    config: ModelConfig, requested: tuple[int, ...] | None, device: torch.device
) -> tuple[int, ...]:
    """The degrees to profile: checked against the model and the machine; always with 1."""
    limit = max_tp_degree(device)
    if requested is None:
        return feasible_tp_degrees(config, limit)
    if not requested:
        raise ValueError("no TP degrees given")
    for degree in requested:
        check_tp_degree(config, degree)
        if degree > limit:
            unit = "GPUs" if device.type == "cuda" else "CPU cores"
            raise ValueError(
                f"TP degree {degree} needs {degree} ranks, but this machine has {limit} {unit}"
            )
    return tuple(sorted({1, *requested}))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_profile_id(model_name: str, device: torch.device, grid_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{slug}.{device.type}.{grid_name}.{stamp}-{uuid.uuid4().hex[:6]}"


class _Steps:
    """Counts finished measurements and reports them."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        self.done += 1
        self.report(stage)

    def report(self, stage: str) -> None:
        if self.callback is not None:
            elapsed_s = time.perf_counter() - self.start
            self.callback(ProgressEvent(stage, self.done, self.total, elapsed_s))


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose every input was checked (the model's config read, weights not)."""

    request: ProfileRequest
    device: torch.device
    dtype: torch.dtype
    grid: ProfileGrid
    config: ModelConfig
    tp_degrees: tuple[int, ...]

    def devices_used(self) -> frozenset[str]:
        """The devices the run keeps busy (CUDA all-reduces span GPUs 0..tp-1)."""
        if self.device.type == "cpu":
            return frozenset({"cpu"})
        ranks = {f"cuda:{rank}" for rank in range(max(self.tp_degrees))}
        return frozenset({f"cuda:{self.device.index or 0}", *ranks})


@dataclass(frozen=True)
class PreparedRun:
    """A checked request with its model loaded: nothing left that bad input can break."""

    request: ProfileRequest
    device: torch.device
    grid: ProfileGrid
    loaded: LoadedModel
    tp_degrees: tuple[int, ...]


def model_config(model: str) -> ModelConfig:
    """A model's config without loading its weights; ValueError for an unknown model."""
    if model == DEFAULT_MODEL_NAME:
        return default_model_config()
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"unknown model {model!r}: expected {DEFAULT_MODEL_NAME!r} or a directory "
            "holding a Hugging Face checkpoint (config.json + *.safetensors)"
        )
    try:
        return ModelConfig.from_hf_dict(json.loads(config_path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the model config {config_path}: {exc}") from None


def check_request(request: ProfileRequest, config: ModelConfig | None = None) -> CheckedRequest:
    """Check every input of a request; raises ValueError with a clear message."""
    device = check_device(request.device)
    dtype = check_dtype(request.dtype, device)
    grid = request.resolved_grid()
    config = config if config is not None else model_config(request.model)
    grid = grid.for_context(config.max_context_tokens)
    tp_degrees = resolve_tp_degrees(config, request.tp_degrees, device)
    return CheckedRequest(request, device, dtype, grid, config, tp_degrees)


def prepare_run(request: ProfileRequest, loaded: LoadedModel | None = None) -> PreparedRun:
    """Check the request and load the model; raises ValueError with a clear message."""
    checked = check_request(request, loaded.config if loaded is not None else None)
    if loaded is None:
        loaded = load_model(request.model, device=str(checked.device), dtype=checked.dtype)
    return PreparedRun(request, checked.device, checked.grid, loaded, checked.tp_degrees)


def run_profile(
    request: ProfileRequest,
    on_progress: ProgressCallback | None = None,
    loaded: LoadedModel | None = None,
    profile_id: str | None = None,
) -> ProfileData:
    """Measure the model on the device and return the profile (not yet written anywhere)."""
    return measure(prepare_run(request, loaded), on_progress, profile_id)


def measure(
    run: PreparedRun, on_progress: ProgressCallback | None = None, profile_id: str | None = None
) -> ProfileData:
    """Time everything a prepared run asks for (the callback may raise ProfilingCancelled)."""
    request, device, grid, loaded = run.request, run.device, run.grid, run.loaded
    tp_degrees = run.tp_degrees
    allocator = configure_allocator()
    num_threads = torch.get_num_threads()
    start = time.perf_counter()
    memory = memory_data(loaded.model, loaded.dtype, tp_degrees)  # before the Linears are packed
    profiler = LayerProfiler(loaded, grid, tp_degrees, num_threads)
    steps = _Steps(profiler.num_steps() + len(tp_degrees), on_progress)
    steps.report("starting")
    layers = profiler.run(steps)
    allreduce = {}
    for tp in tp_degrees[1:]:
        allreduce[tp] = measure_allreduce(
            tp,
            grid.message_bytes,
            device=device.type,
            dtype=dtype_name(loaded.dtype),
            num_warmup=grid.num_warmup,
            num_repeats=max(15, 3 * grid.num_repeats),  # cheap, and noisy across processes
            threads_per_rank=max(1, num_threads // tp),
        )
        steps(f"all-reduce, TP {tp}")
    transfer = measure_transfer(
        grid.message_bytes,
        device=device,
        num_warmup=grid.num_warmup,
        num_repeats=max(15, 3 * grid.num_repeats),
    )
    steps("pipeline hand-off")
    return ProfileData.model_validate(
        {
            "format": FORMAT,
            "version": VERSION,
            "profile_id": profile_id or new_profile_id(loaded.name, device, request.grid_name),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "grid_name": request.grid_name,
            "grid": {**grid.to_dict(), "flush_cache": profiler.flush_cache},
            "profiling_time_s": time.perf_counter() - start,
            "quality": {
                "num_measurements": sum(t.num_measurements for t in profiler.timers()),
                "num_retries": sum(t.num_retries for t in profiler.timers()),
                "num_contended": sum(t.num_contended for t in profiler.timers()),
            },
            "model": {
                **_model_info(loaded, request.model),
                "linear_kernel": profiler.linear_kernel,
            },
            "hardware": {
                "device": str(device),
                "device_name": _device_name(device),
                "num_cpus": os.cpu_count() or 1,
                "platform": platform.platform(),
            },
            "software": {
                "torch_version": torch.__version__,
                "python_version": sys.version.split()[0],
                "exegpt_version": exegpt.__version__,
                "torch_threads": num_threads,
                "allocator": allocator,
            },
            "tp_degrees": list(tp_degrees),
            **_layer_sections(layers, profiler),
            "allreduce": {tp: _comm(series) for tp, series in allreduce.items()},
            "transfer": _comm(transfer),
            "memory": memory,
        }
    )


def _model_info(loaded: LoadedModel, source: str) -> dict[str, object]:
    config = loaded.config
    return {
        "name": loaded.name,
        "source": source,
        "family": config.family,
        "config_hash": config.config_hash(),
        "config": dataclasses.asdict(config),
        "is_encoder_decoder": config.is_encoder_decoder,
        "num_encode_layers": config.num_encoder_layers or config.num_decoder_layers,
        "num_decode_layers": config.num_decoder_layers,
        "hidden_size": config.d_model,
        "dtype": dtype_name(loaded.dtype),
        "dtype_bytes": loaded.dtype.itemsize,
        "max_context_tokens": config.max_context_tokens,
    }


def _layer_sections(layers: LayerMeasurements, profiler: LayerProfiler) -> dict[str, object]:
    enc_dec = profiler.config.is_encoder_decoder
    compute = {}
    for tp, series in layers.compute.items():
        compute[tp] = {
            "threads_per_rank": profiler.shards[tp].num_threads,
            "encode_attention": series["encode_attention"].surface_json(),
            "encode_rest": series["encode_rest"].curve_json(),
            "cross_kv_write": series["cross_kv_write"].curve_json() if enc_dec else None,
            "decode_self_attention": series["decode_self_attention"].surface_json(),
            "decode_cross_attention": (
                series["decode_cross_attention"].surface_json() if enc_dec else None
            ),
            "decode_rest": series["decode_rest"].curve_json(),
        }
    return {
        "compute": compute,
        "prefill_whole": layers.prefill_whole.surface_json(),
        "decode_whole": layers.decode_whole.surface_json(),
        "embedding": layers.embedding.curve_json(),
        "lm_head": layers.lm_head.curve_json(),
    }


def _comm(series: Series) -> dict[str, object]:
    curve = series.curve_json()
    fit = fit_latency_bandwidth(list(curve["sizes"]), list(curve["median_s"]))
    bytes_per_s = fit.bytes_per_s if fit.bytes_per_s != float("inf") else None
    return {"series": curve, "fit": {"latency_s": fit.latency_s, "bytes_per_s": bytes_per_s}}
