"""Chunked prefill (Sarathi-Serve style, --max-tokens-per-step N): a step carries at most N
prompt tokens, so a long prompt is prefilled over several steps, and the running batch
decodes between them instead of waiting for the whole prompt.

Each chunk step is followed by a decode step of the running batch when one is ready (and a
decode step by a chunk step when a prefill waits): the two kinds alternate rather than share
one step. A chunk runs as a decode of T tokens (`StepKind.CHUNK`): its rows attend causally
to the K/V their earlier chunks cached. Only the chunk that ends a prefill yields a token.
Encoder-decoder models (T5) are not chunked: the encoder attends to the whole prompt at once,
and the decoder's prefill is its start token (plus any tokens to recompute).
"""

from __future__ import annotations

from services.worker.sequence import Sequence


class ChunkBudget:
    def __init__(self, max_tokens_per_step: int) -> None:
        if max_tokens_per_step < 1:
            raise ValueError("max_tokens_per_step must be >= 1")
        self.max_tokens = max_tokens_per_step
        self.decode_turn = False  # a chunk step went last: the running batch decodes next

    def has_room(self, pending: list[Sequence]) -> bool:
        """Whether the prefills already waiting leave budget for newly admitted ones."""
        return sum(s.prefill_tokens - s.chunk_start for s in pending) < self.max_tokens

    def select(self, pending: list[Sequence]) -> list[Sequence]:
        """The rows of the next chunk step, in order, each with `chunk_end` set: the rest of
        its prefill or what the budget leaves, until the budget is spent."""
        budget = self.max_tokens
        chosen: list[Sequence] = []
        for seq in pending:
            if budget <= 0:
                break
            start = seq.chunk_start
            seq.chunk_end = min(seq.prefill_tokens, start + budget)
            budget -= seq.chunk_end - start
            chosen.append(seq)
        return chosen


def chunk_budget(max_tokens_per_step: int | None, is_encoder_decoder: bool) -> ChunkBudget | None:
    """The budget, or None where prompts are prefilled whole (off, or a T5 model)."""
    if max_tokens_per_step is None or is_encoder_decoder:
        return None
    return ChunkBudget(max_tokens_per_step)
