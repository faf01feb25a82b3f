"""Chunked prefill with mixed steps (Sarathi-Serve style, --max-tokens-per-step N): one step
carries the running batch's ready decodes (one token each) and, in what they leave of the
budget of N tokens, chunks of the waiting prefills. A long prompt is thus prefilled over several
steps while the running requests keep decoding in every one of them.

A step is a packed batch (exegpt/models/packed.py): each row has its own number of new tokens
and attends to its own cached K/V, so decodes and chunks share the step (`StepKind.MIXED`;
`CHUNK` when no decode is ready, `DECODE` when no prefill waits). Only the chunk that ends a
prefill yields a token. When the ready decodes alone fill the budget and prefills wait, every
other step leaves the decodes out and carries a chunk, so no prompt waits forever.

The budget exists to bound the step time the running decodes wait through (a request's time
per output token): a step that carries a chunk lasts about as long as a decode step plus the
chunk's tokens. While no admitted sequence decodes, no one waits through the step, so the
prefills go whole, as unchunked: one large step costs less than the same tokens over several
(each step has its fixed cost), and the first tokens come sooner.

With a long-output budget M (--long-output-tokens-per-step), a step may carry up to M tokens
instead of N while every decoding sequence is expected to produce at least
`long_output_tokens` tokens in all (its tokens so far plus the expected rest, from the
output lengths seen: exegpt/output_lengths.py). While too few lengths beyond its tokens so
far were seen (a fresh replica), a sequence counts only its tokens so far, never its
max_tokens, so short-output traffic gets N from the start. A request's time per output token is the
mean of its gaps: one long step among many gaps moves it little, while a request of one or
two output tokens has a TPOT of that one step. So the larger budget goes where the running
requests can absorb it (chat-like outputs), and N stays where they cannot (code-like outputs
of 2-3 tokens). A larger chunk prefills a prompt in fewer steps, each paying the step's fixed
part once, so prompts wait less for the prefill lane under load.

Encoder-decoder models (T5) cannot be chunked, and a budget given for one is refused at start:
the encoder is bidirectional (every prompt token attends to every other, later ones
included), so a chunk cannot be encoded alone. Each chunk would need the whole prompt's
encoder pass again, and the decoder's own prefill is only its start token. Their prefill and
decode steps alternate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from services.worker.config import EngineConfig
from services.worker.sequence import Sequence


@dataclass(frozen=True)
class LongOutputBudget:
    """Up to `max_tokens` a step while every decoding sequence is expected to produce at
    least `min_output_tokens` tokens in all."""

    max_tokens: int  # checked with the fixed budget in EngineConfig (exegpt/chunk_budgets.py)
    min_output_tokens: int


class ChunkBudget:
    def __init__(self, max_tokens_per_step: int, long_output: LongOutputBudget | None = None):
        if max_tokens_per_step < 1:
            raise ValueError("max_tokens_per_step must be >= 1")
        self.max_tokens = max_tokens_per_step
        self.long_output = long_output
        self._starved = False  # the last step's decodes left no budget to waiting prefills

    def plan_step(self, expected_outputs: Iterable[float]) -> int:
        """The budget of the next step (its `step_max` below) from the expected output
        lengths (tokens so far plus the expected rest) of the sequences decoding now: the
        long-output budget when there are some and every one expects at least its length,
        else max_tokens_per_step. Reads `expected_outputs` only as far as it must (lazily)."""
        long = self.long_output
        if long is None:
            return self.max_tokens
        expected = iter(expected_outputs)
        first = next(expected, None)  # none decoding: the fixed budget
        absorbs = first is not None and all(
            e >= long.min_output_tokens for e in itertools.chain([first], expected)
        )
        return long.max_tokens if absorbs else self.max_tokens

    def decodes_go_in(self, num_decodes: int, prefills_wait: bool, step_max: int) -> bool:
        """Whether this step carries the ready decodes: yes, unless they left no budget to
        the waiting prefills in the last step too (then this step is a chunk step)."""
        starved = prefills_wait and num_decodes >= step_max
        if starved and self._starved:
            self._starved = False
            return False
        self._starved = starved
        return True

    def has_room(
        self, pending: list[Sequence], step_max: int, num_decodes: int = 0, decoding: bool = True
    ) -> bool:
        """Whether the prefills already waiting leave budget for newly admitted ones."""
        waiting_tokens = sum(s.prefill_left for s in pending)
        return waiting_tokens + num_decodes < _limit(step_max, decoding)

    def select(
        self, pending: list[Sequence], step_max: int, num_decodes: int = 0, decoding: bool = True
    ) -> list[Sequence]:
        """The chunk rows of the next step, in order, each with `chunk_end` set: the rest of
        its prefill or what the step's budget `step_max` (plan_step) leaves after
        `num_decodes` decode tokens. `decoding`: whether any admitted sequence decodes (else
        the prefills go whole)."""
        budget = _limit(step_max, decoding) - num_decodes
        chosen: list[Sequence] = []
        for seq in pending:
            if budget <= 0:
                break
            start = seq.chunk_start
            seq.chunk_end = int(min(seq.prefill_tokens, start + budget))
            budget -= seq.chunk_end - start
            chosen.append(seq)
        return chosen


def _limit(step_max: int, decoding: bool) -> float:
    """Tokens a step may carry: its budget while sequences decode, else no limit."""
    return step_max if decoding else math.inf


def chunk_budget(
    max_tokens_per_step: int | None,
    is_encoder_decoder: bool,
    long_output: LongOutputBudget | None = None,
) -> ChunkBudget | None:
    """The budget, or None where prompts are prefilled whole (off). A budget for an
    encoder-decoder model is a ValueError: its prompts cannot be chunked (see above). The
    budgets themselves are checked in EngineConfig."""
    if max_tokens_per_step is None:
        return None
    if is_encoder_decoder:
        raise ValueError(
            "--max-tokens-per-step (chunked prefill) needs a decoder-only model: an "
            "encoder-decoder model's encoder attends to the whole prompt at once, so a prompt "
            "cannot be encoded in chunks; leave the option out for this model"
        )
    return ChunkBudget(max_tokens_per_step, long_output)


def long_output_budget(config: EngineConfig) -> LongOutputBudget | None:
    """The long-output budget an engine config asks for (None: the fixed budget only)."""
    if config.long_output_tokens_per_step is None:
        return None
    return LongOutputBudget(config.long_output_tokens_per_step, config.long_output_min_tokens)
