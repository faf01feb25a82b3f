"""sjf: shortest predicted remaining work first (prompt tokens, weighted, plus the expected
output tokens learned online, capped by max_tokens), with aging: a request that has waited
`max_wait_s` goes before every other not yet aged, in arrival order, so none waits forever.
When the cache runs out, the running sequence with the most predicted work left is
preempted (it would have waited longest under this policy)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.worker.policies.base import BasePolicy, Load
from services.worker.requests import EngineRequest


class SjfPolicy(BasePolicy):
    name = "sjf"

    def order(self, waiting: Sequence[EngineRequest]) -> list[EngineRequest]:
        now_s = time.monotonic()
        aged = [r for r in waiting if self.waited_s(r, now_s) >= self.config.max_wait_s]
        aged_ids = {id(r) for r in aged}
        fresh = [r for r in waiting if id(r) not in aged_ids]
        return aged + sorted(fresh, key=self.predicted_work)  # sorted() is stable: FCFS ties

    def victim(self, candidates: Sequence[Load]) -> Load:
        def work_left(load: Load) -> tuple[float, int]:
            left = self.lengths.expected_remaining(load.num_generated, load.max_tokens)
            return left, load.seq_id

        return max(candidates, key=work_left)
