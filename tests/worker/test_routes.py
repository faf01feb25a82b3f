"""Where the engine sends a decode step's batch itself: every rank of every decode stage after
the first (which gets the whole step), and nowhere when one stage runs the decode."""

from __future__ import annotations

from exegpt.models.stage_spec import LayerRange
from exegpt.placement import Placement, StagePlacement
from services.worker.executor.routes import batch_hops, first_hops


def stage(encoder: tuple[int, int], decoder: tuple[int, int], tp: int = 1, role: str = "both"):
    return StagePlacement(LayerRange(*encoder), LayerRange(*decoder), tp, role=role)


def test_pp3_with_a_tp2_stage_sends_the_batch_to_every_rank_past_the_first_stage() -> None:
    placement = Placement(
        (stage((0, 2), (0, 1)), stage((2, 4), (1, 3), tp=2), stage((4, 4), (3, 4)))
    )
    data = [["a0"], ["b0", "b1"], ["c0"]]
    assert first_hops(placement, data)["decoder"] == ["a0"]
    assert batch_hops(placement, data) == ["b0", "b1", "c0"]


def test_a_single_decode_stage_gets_no_separate_batch() -> None:
    encoders_apart = Placement((stage((0, 4), (0, 0)), stage((4, 4), (0, 4))))
    assert batch_hops(encoders_apart, [["a"], ["b"]]) == []


def test_a_prefill_decode_split_sends_the_batch_within_the_decode_group_only() -> None:
    placement = Placement(
        (
            stage((0, 0), (0, 4), role="prefill"),
            stage((0, 0), (0, 2), role="decode"),
            stage((0, 0), (2, 4), role="decode"),
        )
    )
    data = [["p"], ["d0"], ["d1"]]
    assert first_hops(placement, data)["decoder"] == ["d0"]
    assert batch_hops(placement, data) == ["d1"]
