"""The Gantt chart's per-device labels (what a device does, how busy it is) and both figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from exegpt.schedule import Schedule, ScheduleKind
from services.scheduler import plots
from services.scheduler.problem import PlanProblem
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
    # The encode device sets the 0.08 s cycle; a decode device works 2 x 0.015 s of it.
    assert plots.busy_fractions(events, 3, 0.24) == pytest.approx([1.0, 0.375, 0.375])


def test_figures_are_written(tmp_path: Path) -> None:
    problem = PlanProblem(ToyCostModel(decoder_only_shape()), toy_workload(), 1.0, 2, 10**9)
    result = plan(problem, space=SearchSpace(max_encode_batch_size=16))
    assert result.chosen is not None
    frontier, gantt = tmp_path / "frontier.png", tmp_path / "timeline.png"
    plots.plot_frontier(result, problem.latency_bound_s, frontier, "toy")
    plots.plot_timeline(timeline(problem, result.chosen.schedule), 2, gantt, "toy")
    for path in (frontier, gantt):
        assert path.read_bytes().startswith(PNG_SIGNATURE)
