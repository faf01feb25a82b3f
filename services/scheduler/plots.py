"""Figures for `exegpt plan`: the latency/throughput frontier and a per-device Gantt chart."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from services.scheduler.problem import PlanResult, Prediction  # noqa: E402
from services.scheduler.simulator.common import TimelineEvent  # noqa: E402

_KIND_STYLE = {
    "rra": ("tab:blue", "o"),
    "waa-c": ("tab:green", "s"),
    "waa-m": ("tab:olive", "D"),
    "static": ("tab:red", "v"),
    "continuous": ("tab:purple", "^"),
}
_EVENT_COLOURS = {
    "encode": "tab:blue",
    "decode": "tab:green",
    "transfer": "tab:orange",
    "allreduce": "tab:purple",
}


def plot_frontier(
    result: PlanResult, latency_bound_s: float, path: str | Path, title: str
) -> Figure:
    """Every feasible evaluated configuration's latency vs throughput, by kind; writes the
    PNG and returns the (closed) figure."""
    figure, axes = plt.subplots(figsize=(11, 5.5), dpi=120)
    by_kind: dict[str, list[Prediction]] = {}
    for prediction in result.evaluated:
        if prediction.feasible:
            by_kind.setdefault(prediction.schedule.kind.value, []).append(prediction)
    for kind, points in by_kind.items():
        colour, marker = _KIND_STYLE.get(kind, ("black", "."))
        axes.scatter(
            [p.latency_s for p in points],
            [p.throughput_seq_s for p in points],
            s=10,
            alpha=0.45,
            color=colour,
            marker=marker,
            label=f"{kind} ({len(points)})",
        )
        # The kind's frontier: the best throughput reachable at each latency.
        ordered = sorted(points, key=lambda p: p.latency_s)
        best = list(itertools.accumulate((p.throughput_seq_s for p in ordered), max))
        axes.step(
            [p.latency_s for p in ordered],
            best,
            where="post",
            color=colour,
            linewidth=1.0,
            alpha=0.8,
        )
    if math.isfinite(latency_bound_s):
        axes.axvline(latency_bound_s, color="black", linestyle="--", linewidth=1)
        axes.axvspan(latency_bound_s, latency_bound_s * 1e6, color="0.5", alpha=0.08, lw=0)
        axes.annotate(
            f"L_B = {latency_bound_s:.3g} s",
            (latency_bound_s, 0.98),  # top left of the line: low latency, low throughput
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8,
        )
    axes.set_xscale("log")
    latencies = [p.latency_s for points in by_kind.values() for p in points]
    if latencies:
        axes.set_xlim(min(latencies) / 1.3, max(latencies) * 1.3)
    axes.set_ylim(bottom=0)
    _mark_best(axes, result)
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.set_xlabel("latency of a p99-length sequence (s, log scale; shaded: over the bound)")
    axes.set_ylabel("throughput (sequences/s)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure


def _mark_best(axes: plt.Axes, result: PlanResult) -> None:
    """Ring each kind's best point; star the chosen one (or the lowest latency)."""
    marked = result.chosen or result.lowest_latency
    for kind, best in result.best_by_kind.items():
        if best is not marked:
            colour, _ = _KIND_STYLE.get(kind, ("black", "."))
            axes.scatter(
                [best.latency_s],
                [best.throughput_seq_s],
                s=70,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.5,
            )
    if marked is None:
        return
    label = "chosen" if result.chosen else "lowest latency (bound not met)"
    # The description goes in the legend (outside the axes), where it hides no point.
    describe = marked.schedule.describe().replace(" B_D=", "\nB_D=")
    axes.scatter(
        [marked.latency_s],
        [marked.throughput_seq_s],
        s=260,
        marker="*",
        color="gold",
        edgecolors="black",
        zorder=5,
        label=f"{label}:\n{describe}\n{marked.throughput_seq_s:.3g} seq/s, "
        f"{marked.latency_s:.3g} s",
    )
    axes.scatter([], [], s=70, facecolors="none", edgecolors="black", label="best of a kind")


def device_roles(events: Sequence[TimelineEvent], num_devices: int) -> list[str]:
    """What each device does in the window: encode, decode or both, and whether it is in a
    tensor-parallel group (it all-reduces)."""
    kinds: list[set[str]] = [set() for _ in range(num_devices)]
    for event in events:
        kinds[event.device].add(event.kind)
    roles = []
    for seen in kinds:
        work = [k for k in ("encode", "decode") if k in seen]
        role = "+".join(work) if work else "idle"
        roles.append(role + (", TP" if "allreduce" in seen else ""))
    return roles


def busy_fractions(events: Sequence[TimelineEvent], num_devices: int, end_s: float) -> list[float]:
    """Share of the window each device computes or all-reduces (transfers overlap compute)."""
    busy = [0.0] * num_devices
    for event in events:
        if event.kind != "transfer":
            busy[event.device] += event.duration_s
    return [min(1.0, b / end_s) if end_s > 0 else 0.0 for b in busy]


def plot_timeline(
    events: Sequence[TimelineEvent], num_devices: int, path: str | Path, title: str
) -> Figure:
    """Gantt chart: one row per device; gaps (grey) are idle time. Compute and all-reduces
    are full-height bars; transfers are thin bars along the bottom of the row, as links that
    may run beside compute (WAA's hand-over does). Writes the PNG and returns the (closed)
    figure."""
    end_s = max((e.end_s for e in events), default=1.0)
    scale, unit = (1e3, "ms") if end_s < 1.0 else (1.0, "s")
    figure, axes = plt.subplots(figsize=(11, 1.2 + 0.6 * num_devices), dpi=120)
    for device in range(num_devices):
        axes.broken_barh([(0, end_s * scale)], (device - 0.4, 0.8), color="0.92")
    for kind, colour in _EVENT_COLOURS.items():
        is_link = kind == "transfer"
        spans: dict[int, list[tuple[float, float]]] = {}
        for event in events:
            if event.kind == kind and event.end_s > event.start_s:
                spans.setdefault(event.device, []).append(
                    (event.start_s * scale, event.duration_s * scale)
                )
        for device, device_spans in spans.items():
            axes.broken_barh(
                device_spans,
                (device + 0.15, 0.25) if is_link else (device - 0.4, 0.8),
                color=colour,
                # White edges separate batches; with hundreds of bars they would only blur.
                edgecolor=colour if is_link or len(device_spans) > 100 else "white",
                linewidth=0.3,
            )
    roles = device_roles(events, num_devices)
    axes.set_yticks(
        range(num_devices), [f"device {d}\n{role}" for d, role in enumerate(roles)], fontsize=8
    )
    for device, fraction in enumerate(busy_fractions(events, num_devices, end_s)):
        axes.annotate(
            f"busy {100 * fraction:.0f}%",
            (1.005, device),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=8,
        )
    axes.invert_yaxis()
    axes.set_xlim(0, end_s * scale)
    axes.set_xlabel(f"time ({unit})")
    handles = [Patch(color=c, label=k) for k, c in _EVENT_COLOURS.items()]
    handles.append(Patch(color="0.92", label="idle"))
    axes.legend(
        handles=handles,
        fontsize=8,
        loc="upper center",
        ncol=5,
        bbox_to_anchor=(0.5, -0.35 if num_devices < 4 else -0.2),
    )
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return figure
