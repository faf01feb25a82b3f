"""The chunk budget on synthetic sequences (chunked.py): while a sequence decodes, a step's
chunks fit the budget left by its decodes; while none does, prefills go whole."""

from __future__ import annotations

import pytest

from exegpt.generation import SamplingParams
from services.worker.chunked import ChunkBudget, chunk_budget
from services.worker.config import EngineConfig
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


def _adaptive(max_tokens: int, factor: float, fixed_s: float, per_token_s: float) -> ChunkBudget:
    """A budget whose clock has seen steps of fixed_s + per_token_s x tokens."""
    budget = ChunkBudget(max_tokens, step_time_factor=factor)
    for num_tokens in [1, 2, 4, 8, 16, 32, 64, 128]:
        budget.observe(num_tokens, fixed_s + per_token_s * num_tokens)
    return budget


def test_an_adaptive_budget_grows_to_what_keeps_the_step_within_the_factor() -> None:
    # 4 decodes alone: 0.5 + 4 x 0.25 = 1.5 s; x3 = 4.5 s holds (4.5 - 0.5) / 0.25 = 16 tokens.
    budget = _adaptive(8, 3.0, 0.5, 0.25)
    assert budget.adaptive_limit(4) == 16
    pending = _pending(50, 30)
    chosen = budget.select(pending, num_decodes=4, decoding=True)
    assert _chunks(chosen) == [(0, 12)]  # 16 tokens less the 4 decodes (a fixed 8 leaves 4)
    assert not budget.has_room(pending, num_decodes=4, decoding=True)
    # More decodes make their step longer, so the step may be too: (3 x 2.5 - 0.5) / 0.25.
    assert budget.adaptive_limit(8) == 28


def test_an_adaptive_budget_never_binds_below_the_fixed_one() -> None:
    # A costly token: 4 decodes alone 0.5 + 4 x 2 = 8.5 s; x1.5 = 12.75 s holds 6 tokens < 8.
    budget = _adaptive(8, 1.5, 0.5, 2.0)
    assert budget.adaptive_limit(4) == 6
    chosen = budget.select(_pending(50), num_decodes=4, decoding=True)
    assert _chunks(chosen) == [(0, 4)]  # the fixed budget of 8, less the 4 decodes


def test_before_its_clock_fits_an_adaptive_budget_is_the_fixed_one() -> None:
    budget = ChunkBudget(8, step_time_factor=3.0)
    budget.observe(4, 1.5)  # one step: no fit yet
    assert budget.adaptive_limit(4) is None
    chosen = budget.select(_pending(50), num_decodes=4, decoding=True)
    assert _chunks(chosen) == [(0, 4)]


def test_a_step_time_factor_needs_a_budget_and_must_exceed_one() -> None:
    with pytest.raises(ValueError, match="step_time_factor"):
        ChunkBudget(8, step_time_factor=1.0)
    with pytest.raises(ValueError, match="give both"):
        chunk_budget(None, False, step_time_factor=2.0)
    with pytest.raises(ValueError, match="needs max_tokens_per_step"):
        EngineConfig(step_time_factor=2.0)
