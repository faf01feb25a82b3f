"""The Gantt chart's per-device labels (what a device does, how busy it is) and what both
figures draw."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler import plots
from services.scheduler.problem import PlanProblem, PlanResult
from services.scheduler.search.plan import SearchSpace, plan
from services.scheduler.simulator.common import TimelineEvent
from services.scheduler.simulator.predict import timeline
from tests.scheduler.toy_cost import ToyCostModel, decoder_only_shape, toy_workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_roles_and_busy_shares_come_from_the_events() -> None:
    events = [
        TimelineEvent(0, 0.0, 0.5, "encode"),
        TimelineEvent(1, 0.0, 0.2, "decode"),
        TimelineEvent(1, 0.2, 0.3, "allreduce"),
        TimelineEvent(1, 0.3, 1.0, "transfer"),  # a link: not counted as busy
        TimelineEvent(2, 0.0, 0.1, "encode"),
        TimelineEvent(2, 0.1, 0.4, "decode"),
    ]
    assert plots.device_roles(events, 4) == ["encode", "decode, TP", "encode+decode", "idle"]
    assert plots.busy_fractions(events, 4, 1.0) == pytest.approx([0.5, 0.3, 0.4, 0.0])


def test_waa_timeline_labels_encode_and_decode_devices() -> None:
    problem = PlanProblem(ToyCostModel(decoder_only_shape()), toy_workload(), math.inf, 3, 10**9)
    schedule = Schedule(ScheduleKind.WAA_C, 4, 1, num_micro_batches=2, num_encode_devices=1)
    events = timeline(problem, schedule)
    assert plots.device_roles(events, 3) == ["encode", "decode", "decode"]
    # The encode device sets the 0.08 s cycle; a decode device works 2 x 0.013 s of it (4 x 1.6
    # decoding rows in 2 micro-batches of 3: the first token comes with the encoding).
    assert plots.busy_fractions(events, 3, 0.24) == pytest.approx([1.0, 0.325, 0.325])


def _planned() -> tuple[PlanProblem, PlanResult]:
    problem = PlanProblem(ToyCostModel(decoder_only_shape()), toy_workload(), 1.0, 2, 10**9)
    result = plan(problem, space=SearchSpace(max_encode_batch_size=16))
    assert result.chosen is not None
    return problem, result


def test_frontier_draws_every_feasible_point_the_choice_and_the_bound(tmp_path: Path) -> None:
    problem, result = _planned()
    path = tmp_path / "frontier.png"
    (axes,) = plots.plot_frontier(result, problem.latency_bound_s, path, "toy").axes
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    feasible: dict[str, list[tuple[float, float]]] = {}
    for prediction in result.evaluated:
        if prediction.feasible:
            point = (prediction.latency_s, prediction.throughput_seq_s)
            feasible.setdefault(prediction.schedule.kind.value, []).append(point)
    drawn = {
        collection.get_label(): sorted(tuple(point) for point in collection.get_offsets().tolist())
        for collection in axes.collections
    }
    assert feasible and all(
        drawn[f"{kind} ({len(points)})"] == sorted(points) for kind, points in feasible.items()
    )
    (star,) = [points for label, points in drawn.items() if label.startswith("chosen:")]
    assert star == [(result.chosen.latency_s, result.chosen.throughput_seq_s)]
    bound_lines = [line for line in axes.lines if list(line.get_xdata()) == [1.0, 1.0]]
    assert len(bound_lines) == 1 and axes.get_xscale() == "log"


def test_timeline_rows_name_each_device_and_its_busy_share(tmp_path: Path) -> None:
    problem, result = _planned()
    events = timeline(problem, result.chosen.schedule)
    path = tmp_path / "timeline.png"
    (axes,) = plots.plot_timeline(events, 2, path, "toy").axes
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    roles = plots.device_roles(events, 2)
    assert [label.get_text() for label in axes.get_yticklabels()] == [
        f"device {device}\n{role}" for device, role in enumerate(roles)
    ]
    end_s = max(event.end_s for event in events)
    shares = plots.busy_fractions(events, 2, end_s)
    assert [text.get_text() for text in axes.texts] == [f"busy {100 * s:.0f}%" for s in shares]
    assert axes.get_xlim()[1] == pytest.approx(end_s * (1e3 if end_s < 1.0 else 1.0))
