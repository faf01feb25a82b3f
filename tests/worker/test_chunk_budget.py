"""The chunk budget on synthetic sequences (chunked.py): while a sequence decodes, a step's
chunks fit the budget left by its decodes; while none does, prefills go whole."""

from __future__ import annotations

from exegpt.generation import SamplingParams
from services.worker.chunked import ChunkBudget
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
