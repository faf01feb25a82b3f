"""Static batching, as FasterTransformer runs it: a batch is admitted whole and the next one
only once every sequence of it has finished (finished ones still leave early and free KV)."""

from __future__ import annotations

from services.worker.modes.base import FcfsMode, ModeView


class StaticMode(FcfsMode):
    def admission_limit(self, view: ModeView) -> int:
        return self.batch_cap(view) if view.num_running == 0 else 0
