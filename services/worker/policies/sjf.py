"""sjf: shortest predicted remaining work first (prompt tokens, weighted, plus the expected
output tokens learned online, capped by max_tokens), with aging: a request that has waited
`max_wait_s` goes before every other not yet aged, in arrival order, so none waits forever.
When the cache runs out, the running sequence with the most predicted work left is
preempted (it would have waited longest under this policy)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence

from services.worker.policies.base import BasePolicy, Load
from services.worker.requests import EngineRequest


class SjfPolicy(BasePolicy):
    name = "sjf"

    def order(self, waiting: Iterable[EngineRequest]) -> Iterator[EngineRequest]:
        """Reads every waiting request (the shortest may have come last), once."""
        now_s = time.monotonic()
        aged: list[EngineRequest] = []
        fresh: list[EngineRequest] = []
        for request in waiting:
            is_aged = self.waited_s(request, now_s) >= self.config.max_wait_s
            (aged if is_aged else fresh).append(request)
        fresh.sort(key=self.predicted_work)  # a stable sort: FCFS among ties
        return itertools.chain(aged, fresh)

    def victim(self, candidates: Sequence[Load]) -> Load:
        def work_left(load: Load) -> tuple[float, int]:
            left = self.lengths.expected_remaining(load.num_generated, load.max_tokens)
            return left, load.seq_id

        return max(candidates, key=work_left)
