"""Continuous (iteration-level) batching, as Orca and vLLM run it: a request joins the running
batch at the next step boundary whenever a slot is free, and leaves as soon as it finishes."""

from __future__ import annotations


class ContinuousMode:
    def admission_limit(self, num_running: int, max_batch_size: int) -> int:
        return max(0, max_batch_size - num_running)
