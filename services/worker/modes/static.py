"""Static batching, as FasterTransformer runs it: a batch is admitted whole and the next one
only once every sequence of it has finished (finished ones still leave early and free KV)."""

from __future__ import annotations


class StaticMode:
    def admission_limit(self, num_running: int, max_batch_size: int) -> int:
        return max_batch_size if num_running == 0 else 0
