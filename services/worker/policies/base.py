"""What an engine policy sees, and the defaults the three policies share.

A policy decides WHO goes next (the order of the waiting queue), whether one more request
may be admitted given the KV cache, and whom to preempt when the cache runs out. Schedule
modes (services/worker/modes/) decide HOW batches form and ask the policy these questions.

KV blocks are allocated as sequences grow; admission only checks that a request's prefill
fits now (plus whatever the policy predicts), and a sequence that cannot grow makes the
scheduler preempt a victim by recompute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from exegpt.output_lengths import OutputLengthModel
from services.worker.policies.config import PolicyConfig
from services.worker.requests import EngineRequest

# Blocks a sequence holds after it generated n tokens: (prompt tokens, n) -> blocks.
BlocksAt = Callable[[int, int], int]


@dataclass(frozen=True)
class Load:
    """An admitted (or candidate) sequence as the KV accounting sees it."""

    prompt_tokens: int
    num_generated: int
    max_tokens: int
    seq_id: int = -1  # -1: a request not admitted yet
    admitted_s: float = 0.0


@dataclass(frozen=True)
class KvState:
    """The cache at an admission decision: `free_blocks` is net of this round's admissions,
    `admitted` holds every running sequence and this round's admissions."""

    num_blocks: int
    free_blocks: int
    admitted: tuple[Load, ...]
    blocks_at: BlocksAt

    def prefill_blocks(self, load: Load) -> int:
        """Blocks a (re)prefill of `load` takes: its prompt and the tokens it generated."""
        return self.blocks_at(load.prompt_tokens, load.num_generated + 1)

    @property
    def watermark(self) -> int:
        """Blocks kept free at admission so the running sequences can grow a little."""
        return max(1, math.ceil(0.01 * self.num_blocks))


class BasePolicy:
    """First come, first served; the newest running sequence is preempted first."""

    name = "base"

    def __init__(self, config: PolicyConfig, lengths: OutputLengthModel) -> None:
        self.config = config
        self.lengths = lengths

    def order(self, waiting: Iterable[EngineRequest]) -> Iterator[EngineRequest]:
        """The waiting requests (oldest first) in the order they should be admitted, lazily:
        a caller that stops early leaves the rest of the queue unread."""
        return iter(waiting)

    def can_admit(self, candidate: Load, state: KvState) -> bool:
        """Whether `candidate` may be (re)admitted now."""
        return state.prefill_blocks(candidate) + state.watermark <= state.free_blocks

    def backfill_steps(self, blocked: Load, state: KvState) -> int:
        """Steps from now until `blocked` (a request that does not fit now) is predicted to
        fit: the admission fixes its deadline from the first answer, and a request behind it
        that fits and is predicted to finish by then (`predicted_left`) may pass it. 0 here,
        strict order; memory_aware's backfill."""
        return 0

    def predicted_left(self, load: Load) -> float:
        """Output tokens `load` is predicted still to generate: here the mean of the lengths
        seen beyond what it generated; memory_aware, whose backfill is the one reader in the
        admission, predicts with its quantile instead."""
        return self.lengths.expected_remaining(load.num_generated, load.max_tokens)

    def victim(self, candidates: Sequence[Load]) -> Load:
        """Which of the (non-empty) preemptible sequences to preempt first."""
        return max(candidates, key=lambda load: load.seq_id)

    def predicted_work(self, request: EngineRequest) -> float:
        """Predicted tokens of work (prefill + decode) a waiting request brings."""
        prefill = self.config.prefill_token_weight * len(request.prompt_token_ids)
        return prefill + self.lengths.expected_remaining(0, request.sampling.max_tokens)

    def waited_s(self, request: EngineRequest, now_s: float | None = None) -> float:
        return (time.monotonic() if now_s is None else now_s) - request.arrival_s
