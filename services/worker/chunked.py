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

With a step time factor K (--step-time-factor), the budget adapts: it binds only where more
tokens would make the step last longer than K times the step of its decodes alone, as the
engine's own clock predicts them (step_time.py: seconds = fixed + per_token x tokens, fitted
on its recent steps). A step's fixed part is the same with one token or a hundred (each
layer's kernels once, the weights read once, the host's planning and sampling), so a fixed
small budget pays it again for every slice of a long prompt: on the tiny Llama of the
benchmarks on one CPU thread, a 320-token prompt in 32-token chunks took 1.5-1.7x its
whole-prompt prefill, of which the same chunk sizes with no prefix to read took 1.3-1.5x
(benchmarks/chunk_cost.py); in 64-token chunks 1.1-1.2x, in 128 about 1.0x. Under K, a
step lasts at most K decode steps, so a request's time per output token stays within K times
a step of decodes alone, while the chunks grow as large as that allows: the more the fixed
part weighs, the larger. The fixed budget stays the floor, and the whole budget while the
clock has no fit yet.

Encoder-decoder models (T5) cannot be chunked, and a budget given for one is refused at start:
the encoder is bidirectional (every prompt token attends to every other, later ones
included), so a chunk cannot be encoded alone. Each chunk would need the whole prompt's
encoder pass again, and the decoder's own prefill is only its start token. Their prefill and
decode steps alternate.
"""

from __future__ import annotations

import math

from services.worker.sequence import Sequence
from services.worker.step_time import StepTimeModel


class ChunkBudget:
    def __init__(self, max_tokens_per_step: int, step_time_factor: float | None = None) -> None:
        if max_tokens_per_step < 1:
            raise ValueError("max_tokens_per_step must be >= 1")
        if step_time_factor is not None and not step_time_factor > 1:
            raise ValueError("step_time_factor must be > 1")
        self.max_tokens = max_tokens_per_step
        self.step_time_factor = step_time_factor
        self.step_time = StepTimeModel()
        self._starved = False  # the last step's decodes left no budget to waiting prefills

    def observe(self, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` new tokens took `seconds` (the clock the budget adapts to)."""
        self.step_time.observe(num_tokens, seconds)

    def decodes_go_in(self, num_decodes: int, prefills_wait: bool) -> bool:
        """Whether this step carries the ready decodes: yes, unless they left no budget to
        the waiting prefills in the last step too (then this step is a chunk step)."""
        starved = prefills_wait and num_decodes >= self._limit(True, num_decodes)
        if starved and self._starved:
            self._starved = False
            return False
        self._starved = starved
        return True

    def has_room(
        self, pending: list[Sequence], num_decodes: int = 0, decoding: bool = True
    ) -> bool:
        """Whether the prefills already waiting leave budget for newly admitted ones."""
        waiting_tokens = sum(s.prefill_left for s in pending)
        return waiting_tokens + num_decodes < self._limit(decoding, num_decodes)

    def select(
        self, pending: list[Sequence], num_decodes: int = 0, decoding: bool = True
    ) -> list[Sequence]:
        """The chunk rows of the next step, in order, each with `chunk_end` set: the rest of
        its prefill or what the budget leaves after `num_decodes` decode tokens. `decoding`:
        whether any admitted sequence decodes (else the prefills go whole)."""
        budget = self._limit(decoding, num_decodes) - num_decodes
        chosen: list[Sequence] = []
        for seq in pending:
            if budget <= 0:
                break
            start = seq.chunk_start
            seq.chunk_end = int(min(seq.prefill_tokens, start + budget))
            budget -= seq.chunk_end - start
            chosen.append(seq)
        return chosen

    def _limit(self, decoding: bool, num_decodes: int) -> float:
        """Tokens a step may carry: the budget while sequences decode, else no limit."""
        if not decoding:
            return math.inf
        return max(self.max_tokens, self.adaptive_limit(num_decodes) or 0)

    def adaptive_limit(self, num_decodes: int) -> int | None:
        """The tokens that keep a step of `num_decodes` decodes (at least one: a decode waits)
        within the factor of their step alone; None without a factor or a fit."""
        if self.step_time_factor is None:
            return None
        alone_s = self.step_time.seconds(max(1, num_decodes))
        if alone_s is None:
            return None
        return self.step_time.tokens_within(self.step_time_factor * alone_s)


def chunk_budget(
    max_tokens_per_step: int | None,
    is_encoder_decoder: bool,
    step_time_factor: float | None = None,
) -> ChunkBudget | None:
    """The budget, or None where prompts are prefilled whole (off). A budget for an
    encoder-decoder model is a ValueError: its prompts cannot be chunked (see above)."""
    if max_tokens_per_step is None:
        if step_time_factor is not None:
            raise ValueError("--step-time-factor adapts --max-tokens-per-step: give both")
        return None
    if is_encoder_decoder:
        raise ValueError(
            "--max-tokens-per-step (chunked prefill) needs a decoder-only model: an "
            "encoder-decoder model's encoder attends to the whole prompt at once, so a prompt "
            "cannot be encoded in chunks; leave the option out for this model"
        )
    return ChunkBudget(max_tokens_per_step, step_time_factor)
