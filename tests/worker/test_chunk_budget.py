"""The chunk budget on synthetic sequences (chunked.py): while a sequence decodes, a step's
chunks fit the budget left by its decodes; while none does, prefills go whole; the
long-output budget holds while every decoding sequence expects a long output."""

from __future__ import annotations

import pytest

from exegpt.generation import SamplingParams
from services.worker.chunked import ChunkBudget, LongOutputBudget, chunk_budget
from services.worker.requests import EngineRequest
from services.worker.sequence import Sequence


def _ignore(event: object) -> None:
    pass


def _pending(*prompt_lengths: int) -> list[Sequence]:
    return [
        Sequence(
            request=EngineRequest(f"r{i}", [5] * n, SamplingParams(max_tokens=4), _ignore),
            seq_id=i,
            seed=0,
            group=0,
        )
        for i, n in enumerate(prompt_lengths)
    ]


def _chunks(chosen: list[Sequence]) -> list[tuple[int, int]]:
    return [(seq.chunk_start, seq.chunk_end) for seq in chosen]


def test_while_sequences_decode_the_chunks_fit_what_the_decodes_leave() -> None:
    budget = ChunkBudget(64)
    pending = _pending(50, 30, 10)
    chosen = budget.select(pending, num_decodes=4, decoding=True)
    assert _chunks(chosen) == [(0, 50), (0, 10)]  # 60 tokens left: 50, then 10 of the 30
    assert not budget.has_room(pending, num_decodes=4, decoding=True)


def test_with_no_sequence_decoding_prefills_go_whole() -> None:
    budget = ChunkBudget(64)
    pending = _pending(300, 200, 5)
    assert budget.has_room(pending, decoding=False)
    chosen = budget.select(pending, decoding=False)
    assert _chunks(chosen) == [(0, 300), (0, 200), (0, 5)]


def test_the_long_output_budget_holds_while_every_decode_expects_a_long_output() -> None:
    budget = ChunkBudget(32, LongOutputBudget(max_tokens=128, min_output_tokens=16))
    # Every decoding sequence expects 16 or more output tokens in all: up to 128 a step.
    assert budget.plan_step([16.0, 30.5, 80.0]) == 128
    chosen = budget.select(_pending(300, 40), num_decodes=3, decoding=True)
    assert _chunks(chosen) == [(0, 125)]  # 128 - 3 decodes, all to the first prompt
    assert budget.has_room(_pending(100), num_decodes=3, decoding=True)  # 103 < 128
    # One of them expects 15.9 (say 2 so far and 13.9 to come): the fixed 32 again.
    assert budget.plan_step([15.9, 30.5, 80.0]) == 32
    chosen = budget.select(_pending(300, 40), num_decodes=3, decoding=True)
    assert _chunks(chosen) == [(0, 29)]  # 32 - 3
    assert not budget.has_room(_pending(100), num_decodes=3, decoding=True)
    # Nothing decoding: the fixed budget is planned (and the prefills go whole anyway).
    assert budget.plan_step([]) == 32


def test_without_a_long_output_budget_the_budget_stays_fixed() -> None:
    budget = ChunkBudget(32)
    assert budget.plan_step([500.0, 900.0]) == 32
    chosen = budget.select(_pending(100), num_decodes=2, decoding=True)
    assert _chunks(chosen) == [(0, 30)]


def test_a_long_output_budget_must_exceed_the_budget_and_needs_one() -> None:
    with pytest.raises(ValueError, match="must exceed --max-tokens-per-step"):
        chunk_budget(64, False, LongOutputBudget(64, 16))
    with pytest.raises(ValueError, match="needs --max-tokens-per-step"):
        chunk_budget(None, False, LongOutputBudget(128, 16))
    with pytest.raises(ValueError, match=">= 1"):
        LongOutputBudget(128, 0)


def test_the_expected_outputs_are_read_only_as_far_as_the_choice_needs() -> None:
    read: list[float] = []

    def expected(values: list[float]):
        for value in values:
            read.append(value)
            yield value

    assert ChunkBudget(32).plan_step(expected([40.0, 50.0])) == 32
    assert read == []  # no long-output budget: nothing to estimate
    budget = ChunkBudget(32, LongOutputBudget(max_tokens=128, min_output_tokens=16))
    assert budget.plan_step(expected([40.0, 3.0, 50.0])) == 32
    assert read == [40.0, 3.0]  # the first short one decides
