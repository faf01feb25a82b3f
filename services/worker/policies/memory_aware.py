"""memory_aware: admit a request only while the predicted peak KV of everything admitted
still fits the cache.

Each sequence is predicted to generate up to a high quantile of the output lengths observed
so far (of those longer than what it has already generated; capped by its max_tokens, which
is also the prediction until enough lengths were seen). Sequences finish at different times,
so the peak is taken over the moments each one is predicted to finish: at the t-th step from
now every sequence still running holds the blocks of its tokens so far plus t.
Preemptions become rare, while the cache is used better than by a worst-case reservation.

Backfill (PolicyConfig.backfill, worker --backfill; off by default): when the request at
the head of the queue does not fit, a request behind it is admitted if it fits now and is
predicted to finish (its predicted output, from the same quantile) by the head's deadline:
the step at which the head was predicted to fit when it first blocked
(`predicted_start_step`: the first moment the running sequences' predicted finishes leave
room for it), fixed then and never extended (exegpt/output_lengths.BackfillDeadlines); in
strict order once it has passed. It uses memory that would stand idle while the head waits.
The head's start is delayed by at most what the backfilled requests run past the deadline:
little if their predictions hold (under chunked prefill a decode may sit out a step the
token budget gives to others), and each ends by its max_tokens in any case. Without
backfill one large prompt at the head holds back every smaller request behind it while
memory drains.
"""

from __future__ import annotations

from collections.abc import Sequence

from exegpt.output_lengths import predicted_peak_blocks, predicted_start_step
from services.worker.policies.base import BasePolicy, KvState, Load


class MemoryAwarePolicy(BasePolicy):
    name = "memory_aware"

    def can_admit(self, candidate: Load, state: KvState) -> bool:
        if not super().can_admit(candidate, state):
            return False
        budget = state.num_blocks - state.watermark
        return self.predicted_peak([*state.admitted, candidate], state) <= budget

    def backfill_steps(self, blocked: Load, state: KvState) -> int:
        """With backfill on, the steps from now until the `blocked` head is predicted to fit
        (the admission fixes its deadline from the first answer for that head)."""
        if not self.config.backfill:
            return 0
        return predicted_start_step(
            [self._prediction(load) for load in state.admitted],
            self._prediction(blocked),
            state.num_blocks - state.watermark,
            state.blocks_at,
        )

    def predicted_total(self, load: Load) -> int:
        """Output tokens `load` is predicted to end with."""
        return self.lengths.quantile(
            self.config.length_quantile, load.num_generated, load.max_tokens
        )

    def predicted_left(self, load: Load) -> int:
        """Output tokens `load` is predicted still to generate."""
        return self.predicted_total(load) - load.num_generated

    def predicted_peak(self, loads: Sequence[Load], state: KvState) -> int:
        """Most blocks the sequences are predicted to hold at once from now on."""
        sequences = [self._prediction(load) for load in loads]
        return predicted_peak_blocks(sequences, state.blocks_at)

    def _prediction(self, load: Load) -> tuple[int, int, int]:
        """(prompt tokens, generated, predicted left), as predicted_peak_blocks reads them."""
        return load.prompt_tokens, load.num_generated, self.predicted_left(load)
