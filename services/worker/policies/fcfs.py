"""fcfs (vLLM's default): admit in arrival order whenever the prompt's blocks are free,
allocate KV as sequences grow, and when the cache runs out preempt the newest running
request by recompute (it goes back to the head of the queue with its tokens)."""

from __future__ import annotations

from services.worker.policies.base import BasePolicy


class FcfsPolicy(BasePolicy):
    name = "fcfs"
