"""`exegpt profile`: measure a model's building blocks on a device, or check a profile.

    exegpt profile --model M [--device cpu|cuda] [--tp 1,2] [--grid quick|full] --out FILE
    exegpt profile --validate FILE

Profiling checks every input (model, device, grid, TP degrees, output path) before the first
measurement and writes the file atomically, so bad input or an interrupted run leaves no
file behind. Validation runs whole-model forwards and prints predicted vs measured times.
Bad input gives exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from exegpt.dtypes import DEFAULT_DTYPE
from exegpt.models.defaults import DEFAULT_MODEL_NAME

DESCRIPTION = "profile the model's layers on a device, or check a profile against whole forwards"

# --flag -> grid field, for the per-axis overrides of the chosen grid.
AXIS_FLAGS = {
    "batch_sizes": "batch_sizes",
    "seq_lens": "seq_lens_tokens",
    "kv_lens": "kv_lens_tokens",
    "num_tokens": "num_tokens",
    "message_bytes": "message_bytes",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"model name or Hugging Face checkpoint directory (default: {DEFAULT_MODEL_NAME}; "
        "with --validate: the model the profile names)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        help="float32, bfloat16, float16, or auto (bfloat16 where the device computes it fast, "
        "else float32; the profile records what it resolved to). Profile in the dtype the "
        "workers serve in: `exegpt plan` refuses a profile of another dtype",
    )
    parser.add_argument(
        "--tp",
        default=None,
        help="comma-separated tensor-parallel degrees, e.g. 1,2 (1 is always measured; "
        "default: every degree that divides the heads and fits the machine)",
    )
    parser.add_argument(
        "--grid",
        default="quick",
        help="measurement grid: quick (about 2 minutes for the default model on 2 cores), "
        "full, custom (give every size axis below), or a JSON file of grid fields",
    )
    axes = parser.add_argument_group(
        "grid overrides", "comma-separated sizes replacing the chosen grid's axis"
    )
    axes.add_argument("--batch-sizes", help="attention batch sizes (sequences)")
    axes.add_argument("--seq-lens", help="encode attention prompt lengths (tokens)")
    axes.add_argument("--kv-lens", help="decode attention KV lengths (tokens)")
    axes.add_argument("--num-tokens", help="rest of layer, embedding, LM head (tokens)")
    axes.add_argument("--message-bytes", help="all-reduce and hand-off sizes (bytes)")
    axes.add_argument("--repeats", type=int, help="timed repeats per point")
    axes.add_argument("--warmup", type=int, help="untimed warm-up runs per point")
    axes.add_argument(
        "--min-sample-s",
        type=float,
        help="seconds each timed sample lasts at least, short work repeated within it "
        "(default 0.01)",
    )
    axes.add_argument(
        "--rounds",
        type=int,
        help="passes over the whole grid (medians combined); with --validate: passes over "
        "the forwards (default there: 10)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--serving",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure the serving path's host work on a real deployment (exegpt up + "
        "exegpt bench, about a minute) for the simulator to add to the forwards (default: "
        "with the quick and full grids, overridden or not)",
    )
    parser.add_argument("--out", help="write the profile to this JSON file")
    parser.add_argument(
        "--validate",
        metavar="FILE",
        help="instead of profiling: time whole-model prefills and decode steps and print "
        "each next to the profile's prediction, with the relative errors",
    )
    parser.add_argument("--json", help="with --validate: also write the points to this file")
    parser.add_argument(
        "--points",
        help="with --validate: these forwards instead of the standard set, comma-separated "
        "prefill:BATCH:PROMPT and decode:BATCH:PROMPT:CACHED (e.g. decode:256:32:21)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


class UsageError(ValueError):
    """Bad command-line input."""


def run(args: argparse.Namespace) -> int:
    from exegpt.profile.format import ProfileError

    try:
        if args.threads is not None:
            _set_threads(args.threads)
        if args.validate:
            return _validate(args)
        return _profile(args)
    except (UsageError, ProfileError, ValueError) as error:
        sys.stderr.write(f"exegpt profile: error: {error}\n")
        return 2
    except RuntimeError as error:  # a measurement failed (a rank died, a message was lost)
        sys.stderr.write(f"exegpt profile: measurement failed, nothing written: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("exegpt profile: interrupted; nothing written\n")
        return 130


def _set_threads(num_threads: int) -> None:
    import torch

    if num_threads < 1:
        raise UsageError(f"--threads must be at least 1, got {num_threads}")
    torch.set_num_threads(num_threads)


# ---- profiling -----------------------------------------------------------------------------


def parse_sizes(text: str, flag: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16); an empty list is left for the grid to reject by name."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_points(text: str) -> tuple[Any, ...]:
    """'prefill:64:32,decode:256:32:21' -> the forwards `--validate` times."""
    from services.profiler.measure.forwards import decode, prefill

    points = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, *sizes = item.split(":")
        try:
            numbers = [int(size) for size in sizes]
        except ValueError:
            numbers = []
        if kind == "prefill" and len(numbers) == 2 and min(numbers) >= 1:
            points.append(prefill(*numbers))
        elif kind == "decode" and len(numbers) == 3 and min(numbers[:2]) >= 1 and numbers[2] >= 0:
            points.append(decode(*numbers))
        else:
            raise UsageError(
                f"--points: {item!r} is not prefill:BATCH:PROMPT or decode:BATCH:PROMPT:CACHED "
                "(whole numbers, batch and prompt at least 1)"
            )
    if not points:
        raise UsageError("--points names no forward")
    return tuple(dict.fromkeys(points))  # each forward once, in the order named


def grid_from_args(args: argparse.Namespace) -> tuple[str, Any]:
    """(grid name, ProfileGrid) from --grid and the per-axis overrides."""
    from services.profiler.measure.grid import PRESETS, build_grid

    overrides: dict[str, Any] = {}
    for attr, field in AXIS_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides[field] = parse_sizes(value, "--" + attr.replace("_", "-"))
    if args.repeats is not None:
        overrides["num_repeats"] = args.repeats
    if args.warmup is not None:
        overrides["num_warmup"] = args.warmup
    if args.rounds is not None:
        overrides["num_rounds"] = args.rounds
    if args.min_sample_s is not None:
        overrides["min_sample_s"] = args.min_sample_s
    base: str | None = args.grid
    if base not in PRESETS and base != "custom":
        overrides = {**_grid_file(base), **overrides}
        base = None
    return build_grid(None if base == "custom" else base, overrides)


def _grid_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"unknown grid {path!r}: use quick, full, custom or a JSON file")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"grid file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"grid file {path} must hold a JSON object of grid fields")
    return data


def _profile(args: argparse.Namespace) -> int:
    from exegpt.profile.format import check_writable, write_profile
    from services.profiler.measure.run import ProfileRequest, measure, prepare_run

    if not args.out:
        raise UsageError("--out FILE is required (or --validate FILE to check a profile)")
    if args.json or args.points:
        raise UsageError("--json and --points only apply with --validate")
    grid_name, grid = grid_from_args(args)
    tp = parse_sizes(args.tp, "--tp") if args.tp is not None else None
    if tp is not None and not tp:
        raise UsageError("--tp is empty: give degrees like 1,2")
    out = check_writable(args.out)  # before minutes of measuring, not after
    request = ProfileRequest(
        model=args.model or DEFAULT_MODEL_NAME,
        device=args.device or "cpu",
        dtype=args.dtype,
        grid_name=grid_name,
        grid=grid,
        tp_degrees=tp,
    )
    prepared = prepare_run(request)
    with _ProgressBar(disabled=args.no_progress) as bar:
        profile = measure(prepared, bar.update)
    if args.serving if args.serving is not None else args.grid in ("quick", "full"):
        profile = _with_serving(profile, request, args.no_progress)
    path = write_profile(profile, out)
    quality = profile.quality
    sys.stdout.write(
        f"wrote {path}\n"
        f"  profile {profile.profile_id}: {profile.model.name} on {profile.hardware.device} "
        f"({profile.hardware.device_name}), TP degrees {profile.tp_degrees}, "
        f"{profile.software.torch_threads} threads\n"
        f"  grid {profile.grid_name}: {quality.num_measurements} measurements in "
        f"{profile.profiling_time_s:.1f} s ({quality.num_retries} re-measured after "
        f"contention, {quality.num_contended} kept contended)\n"
    )
    return 0


def _with_serving(profile: Any, request: Any, quiet: bool) -> Any:
    """The profile with its `serving` section measured (services/profiler/serving.py)."""
    from services.profiler.serving import ServingSettings, measure_serving

    settings = ServingSettings(request.model, request.device, profile.model.dtype)
    if not quiet:
        sys.stderr.write(f"measuring the serving path: {settings.method}\n")
    serving = measure_serving(settings)
    sys.stdout.write(
        f"  serving: {serving.step_s * 1e3:.2f} ms per step, {serving.token_s * 1e3:.3f} ms "
        f"per token, {serving.request_s * 1e3:.2f} ms per request; engine busy "
        f"{serving.busy_fraction:.0%} in forwards\n"
    )
    return profile.model_copy(update={"serving": serving})


class _ProgressBar:
    """A tqdm bar on stderr fed by the profiler's progress events."""

    def __init__(self, disabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="step", file=sys.stderr, disable=disabled, leave=True)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def update(self, event: Any) -> None:
        if self._bar.total != event.num_total:
            self._bar.total = event.num_total
        self._bar.set_description(event.stage, refresh=False)
        self._bar.update(event.num_done - self._bar.n)


# ---- validation ----------------------------------------------------------------------------


def _validate(args: argparse.Namespace) -> int:
    from exegpt.dtypes import torch_dtype
    from exegpt.models.loader import load_model
    from exegpt.profile.layer_profile import load_profile
    from services.profiler.measure.run import check_device
    from services.profiler.measure.validate import (
        VALIDATION_ROUNDS,
        common_shift,
        format_table,
        repeatability,
        summarize,
        validate_profile,
    )

    if args.out:
        raise UsageError("--out does not apply with --validate")
    chosen = {"points": parse_points(args.points)} if args.points else {}
    profile = load_profile(args.validate)
    data = profile.data
    device = check_device(args.device or data.hardware.device)
    model = args.model or data.model.source
    loaded = load_model(model, device=str(device), dtype=torch_dtype(data.model.dtype))
    past = [p for p in chosen.get("points", ()) if not p.fits(loaded.config)]
    if past:
        raise UsageError(
            f"--points: {len(past)} forward(s) pass the model's context of "
            f"{loaded.config.max_context_tokens} tokens (e.g. {past[0]})"
        )
    profile = load_profile(args.validate, expected_config_hash=loaded.config.config_hash())
    num_threads = args.threads or data.software.torch_threads
    num_rounds = args.rounds if args.rounds is not None else VALIDATION_ROUNDS
    if num_rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {num_rounds}")
    sys.stdout.write(
        f"validating {data.profile_id} ({data.model.name}, grid {data.grid_name}) with whole "
        f"forwards on {device}, {num_threads} threads, TP 1, {num_rounds} rounds\n"
    )
    # The table flags extrapolated predictions; the profile's per-query warnings would repeat it.
    logging.getLogger("exegpt.profile.layer_profile").setLevel(logging.ERROR)
    from tqdm import tqdm

    with tqdm(unit="forward", file=sys.stderr, disable=args.no_progress, desc="forwards") as bar:

        def step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        points = validate_profile(
            profile,
            loaded,
            num_threads=num_threads,
            num_rounds=num_rounds,
            on_step=step,
            **chosen,
        )
    sys.stdout.write(format_table(points) + "\n")
    if args.json:
        median, worst = summarize(points)
        report = {
            "profile": str(args.validate),
            "profile_id": data.profile_id,
            "num_threads": num_threads,
            "num_rounds": num_rounds,
            "median_abs_error": median,
            "worst_abs_error": worst,
            "repeatability": repeatability(points),
            "common_shift": common_shift(points),
            "points": [_point_json(point) for point in points],
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _point_json(point: Any) -> dict[str, Any]:
    return {
        "kind": point.point.kind,
        "batch_size": point.point.batch_size,
        "prompt_tokens": point.point.prompt_tokens,
        "kv_len_tokens": point.point.kv_len_tokens,
        "predicted_s": point.predicted_s,
        "measured_s": point.measured_s,
        "measured_p10_s": point.measured.p10_s,
        "measured_p90_s": point.measured.p90_s,
        "relative_error": point.relative_error,
        "halves_differ": point.halves_differ(),
        "extrapolated": point.extrapolated,
    }
