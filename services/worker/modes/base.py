"""What a schedule mode sees and decides at a step boundary, and the defaults the simple
modes keep. Whom to admit first and whom to preempt is the engine policy's (policies/): a mode
takes the waiting queue in the policy's order, lazily: it reads only as far as it chooses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.worker.policies import BasePolicy, Load, OutputLengthModel, PolicyConfig, make_policy
from services.worker.requests import EngineRequest
from services.worker.waiting_queue import WaitingQueue


@dataclass(frozen=True)
class ModeView:
    num_running: int  # admitted and not finished (prefilling or decoding)
    num_prefilling: int  # in a prefill step now
    max_batch_size: int


class FcfsMode:
    """Admit in the policy's order (arrival order by default); decode whenever sequences are
    ready."""

    def __init__(self, num_micro_batches: int = 1, batch_size: int | None = None) -> None:
        self.num_micro_batches = num_micro_batches
        self.batch_size = batch_size  # a planned schedule's batch (None: the replica's max)
        self.policy: BasePolicy = make_policy(PolicyConfig(), OutputLengthModel())

    def use_policy(self, policy: BasePolicy) -> None:
        self.policy = policy

    def batch_cap(self, view: ModeView) -> int:
        """The running batch's size limit: the planned batch, within the replica's maximum."""
        if self.batch_size is None:
            return view.max_batch_size
        return min(self.batch_size, view.max_batch_size)

    def admission_limit(self, view: ModeView) -> int:
        """How many waiting requests may be admitted now (0: none)."""
        return max(0, self.batch_cap(view) - view.num_running)

    def choose(self, waiting: WaitingQueue, limit: int) -> Iterable[EngineRequest]:
        """The candidates to admit, in the order to admit them: the admission admits at most
        `limit`, and reads on lazily only while it admits, or while it backfills past one that
        did not fit (services/worker/admission.py): the rest of the queue is not walked."""
        return self.policy.order(waiting)

    def victim(self, candidates: Sequence[Load]) -> Load:
        """Whom to preempt first when the KV cache runs out (the policy decides)."""
        return self.policy.victim(candidates)

    def on_admitted(self, num_admitted: int, view: ModeView) -> None:
        """An admission round with a non-zero limit ended (num_admitted may be 0)."""

    def may_decode(self, view: ModeView) -> bool:
        return True

    def on_decoded(self, num_finished: int) -> None:
        """A decode step of the running batch came back; `num_finished` sequences left."""
