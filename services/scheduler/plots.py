"""Figures for `exegpt plan`: the latency/throughput frontier and a per-device Gantt chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from services.scheduler.problem import PlanResult, Prediction  # noqa: E402
from services.scheduler.sim_common import TimelineEvent  # noqa: E402

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


def plot_frontier(result: PlanResult, latency_bound_s: float, path: str | Path, title: str) -> None:
    """Every feasible evaluated configuration's latency vs throughput, by kind."""
    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=120)
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
    if math.isfinite(latency_bound_s):
        axes.axvline(latency_bound_s, color="black", linestyle="--", linewidth=1)
        axes.annotate(
            f"L_B = {latency_bound_s:.3g} s",
            (latency_bound_s, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            fontsize=8,
        )
    axes.set_xscale("log")
    _mark_best(axes, result)
    axes.set_xlabel("latency of a p99-length sequence (s, log scale)")
    axes.set_ylabel("throughput (sequences/s)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


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
    axes.scatter(
        [marked.latency_s],
        [marked.throughput_seq_s],
        s=260,
        marker="*",
        color="gold",
        edgecolors="black",
        zorder=5,
        label=label,
    )
    # Label towards the middle of the plot so the text stays inside it.
    low, high = axes.get_xlim()
    right_half = math.log(marked.latency_s) > (math.log(low) + math.log(high)) / 2
    axes.annotate(
        marked.schedule.describe(),
        (marked.latency_s, marked.throughput_seq_s),
        textcoords="offset points",
        xytext=(-12, -16) if right_half else (12, -16),
        ha="right" if right_half else "left",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )


def plot_timeline(
    events: Sequence[TimelineEvent], num_devices: int, path: str | Path, title: str
) -> None:
    """Gantt chart: one row per device; gaps (grey) are idle time."""
    end_s = max((e.end_s for e in events), default=1.0)
    scale, unit = (1e3, "ms") if end_s < 1.0 else (1.0, "s")
    figure, axes = plt.subplots(figsize=(11, 1.0 + 0.6 * num_devices), dpi=120)
    for device in range(num_devices):
        axes.broken_barh([(0, end_s * scale)], (device - 0.4, 0.8), color="0.92")
    for kind, colour in _EVENT_COLOURS.items():
        # Transfers and all-reduces are drawn as thinner bars so they read as links, not work.
        height = 0.8 if kind in ("encode", "decode") else 0.35
        spans: dict[int, list[tuple[float, float]]] = {}
        for event in events:
            if event.kind == kind and event.end_s > event.start_s:
                spans.setdefault(event.device, []).append(
                    (event.start_s * scale, event.duration_s * scale)
                )
        for device, device_spans in spans.items():
            axes.broken_barh(
                device_spans,
                (device - height / 2, height),
                color=colour,
                edgecolor="white",
                linewidth=0.3,
            )
    axes.set_yticks(range(num_devices), [f"device {d}" for d in range(num_devices)])
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
