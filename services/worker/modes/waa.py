"""WAA (workload-aware allocation, ExeGPT section 4): encoding and decoding run on separate
devices, asynchronously. Whenever no encoding is in flight, up to B_E waiting queries are
encoded (the placement sends prefills to the encoding stages); encoded queries join the
decode batch, capped at B_D, which steps as B_m independent micro-batches through the
decoding stages' pipeline."""

from __future__ import annotations

from exegpt.schedule import Schedule
from services.worker.modes.base import FcfsMode, ModeView


class WaaMode(FcfsMode):
    def __init__(self, schedule: Schedule) -> None:
        super().__init__(schedule.num_micro_batches)
        self.encode_batch_size = schedule.encode_batch_size
        self.decode_batch_size = schedule.decode_batch_size

    def admission_limit(self, view: ModeView) -> int:
        if view.num_prefilling:
            return 0
        return max(0, min(self.encode_batch_size, self.decode_batch_size - view.num_running))
