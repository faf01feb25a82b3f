"""What a schedule mode sees and decides at a step boundary, and the first-come-first-served
defaults the simple modes keep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.worker.requests import EngineRequest


@dataclass(frozen=True)
class ModeView:
    num_running: int  # admitted and not finished (prefilling or decoding)
    num_prefilling: int  # in a prefill step now
    max_batch_size: int


class FcfsMode:
    """Admit in arrival order; decode whenever sequences are ready."""

    def __init__(self, num_micro_batches: int = 1) -> None:
        self.num_micro_batches = num_micro_batches

    def admission_limit(self, view: ModeView) -> int:
        """How many waiting requests may be admitted now (0: none)."""
        return max(0, view.max_batch_size - view.num_running)

    def choose(self, waiting: Sequence[EngineRequest], limit: int) -> list[EngineRequest]:
        """Which waiting requests to admit, at most `limit`, in the order to admit them."""
        return list(waiting[:limit])

    def on_admitted(self, num_admitted: int, view: ModeView) -> None:
        """An admission round with a non-zero limit ended (num_admitted may be 0)."""

    def may_decode(self, view: ModeView) -> bool:
        return True

    def on_decoded(self, num_finished: int) -> None:
        """A decode step of the running batch came back; `num_finished` sequences left."""
