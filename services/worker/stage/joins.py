"""Joining a decode step's two inputs at a stage past the first: its batch, which the engine
sends to every stage of the route at submit, and the hidden state from the stage before.

The engine sends a `batch` message (the step's batch and sampling tensors) to each stage of a
decode route but the first, so a stage forwards only the hidden state (`batch_sent` steps,
stage/steps.py): the batch is encoded once, by the engine, and no stage re-encodes it. The two
parts come over different connections, so either may arrive first; whichever comes second
completes the step. Within one load, hidden states reach a stage in step order (one sender,
one FIFO connection, steps submitted in order), which bounds what is kept:
- joining step S drops every batch kept for a step before S (its hidden state will never
  come: an earlier stage failed that step and told the engine);
- a hidden state for a step at or before the last one joined is refused (a replay, or a step
  whose batch was dropped);
- a hidden state whose batch has not come within `wait_s` is refused, and so is the oldest
  part kept once `max_kept` are waiting.
A refused hidden state goes back to the engine as that step's error, so the step fails at once
rather than at the engine's step timeout. Parts hold shared-memory slots of their senders:
nothing is kept longer than these rules allow.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from exegpt.transport import TensorMessage

DEFAULT_WAIT_S = 5.0
DEFAULT_MAX_KEPT = 16


@dataclass(frozen=True)
class Refused:
    """A hidden state this stage will not run: its step and why."""

    step_id: str
    reason: str


# The measured hand-off that brought a hidden state (services/worker/handoff.py), kept with it.
Handoff = tuple[int, float] | None
Joined = tuple[TensorMessage, Handoff]


@dataclass
class _Kept:
    message: TensorMessage
    arrived_s: float
    handoff: Handoff = None


class StepJoin:
    """The parts of decode steps kept until their other part comes (one load's worth)."""

    def __init__(self, wait_s: float = DEFAULT_WAIT_S, max_kept: int = DEFAULT_MAX_KEPT) -> None:
        self._wait_s = wait_s
        self._max_kept = max_kept
        self._batches: OrderedDict[int, _Kept] = OrderedDict()
        self._hidden: OrderedDict[int, _Kept] = OrderedDict()
        self._last_joined = -1
        self.refused: list[Refused] = []  # taken by the caller, which answers the engine

    def reset(self) -> None:
        """A new load: nothing kept belongs to it."""
        self._batches.clear()
        self._hidden.clear()
        self._last_joined = -1
        self.refused.clear()

    @property
    def num_kept(self) -> int:
        return len(self._batches) + len(self._hidden)

    def add_batch(self, message: TensorMessage) -> Joined | None:
        """A step's batch from the engine: the whole step if its hidden state is here."""
        step = _step_id(message)
        if step is None or step <= self._last_joined:
            return None  # malformed, or its step already ran or was refused: nothing to do
        hidden = self._hidden.pop(step, None)
        if hidden is not None:
            return self._joined(step, message, hidden.message), hidden.handoff
        self._batches[step] = _Kept(message, time.monotonic())
        self._bound(self._batches, refuse=False)
        return None

    def add_hidden(self, message: TensorMessage, handoff: Handoff = None) -> Joined | None:
        """A hidden state from the stage before (and the hand-off that brought it): the whole
        step if its batch is here."""
        step = _step_id(message)
        if step is None:
            self._refuse("?", "it has no step id")
            return None
        batch = self._batches.pop(step, None)
        if batch is not None:
            return self._joined(step, batch.message, message), handoff
        if step <= self._last_joined:
            self._refuse(str(step), "its step already ran, or its batch was dropped")
            return None
        self._hidden[step] = _Kept(message, time.monotonic(), handoff)
        self._bound(self._hidden, refuse=True)
        return None

    def expire(self) -> None:
        """Drop batches and refuse hidden states kept past `wait_s`."""
        deadline = time.monotonic() - self._wait_s
        for kept, refuse in ((self._batches, False), (self._hidden, True)):
            while kept and next(iter(kept.values())).arrived_s < deadline:
                self._drop_oldest(kept, refuse, f"no batch came within {self._wait_s:.0f} s")

    def _joined(self, step: int, batch: TensorMessage, hidden: TensorMessage) -> TensorMessage:
        self._last_joined = max(self._last_joined, step)
        for orphan in [s for s in self._batches if s < step]:
            del self._batches[orphan]
        # The hidden state's attributes (route times, hand-offs, compute so far) win.
        return TensorMessage(
            hidden.kind,
            {**batch.tensors, **hidden.tensors},
            trace_context=hidden.trace_context,
            attributes={**batch.attributes, **hidden.attributes},
        )

    def _bound(self, kept: OrderedDict[int, _Kept], refuse: bool) -> None:
        while len(kept) > self._max_kept:
            self._drop_oldest(kept, refuse, f"more than {self._max_kept} steps waiting")

    def _drop_oldest(self, kept: OrderedDict[int, _Kept], refuse: bool, reason: str) -> None:
        step, entry = kept.popitem(last=False)
        self._last_joined = max(self._last_joined, step)
        if refuse:
            self._refuse(str(step), reason)

    def _refuse(self, step_id: str, reason: str) -> None:
        self.refused.append(Refused(step_id, f"step {step_id}'s hidden state refused: {reason}"))


def _step_id(message: TensorMessage) -> int | None:
    try:
        return int(message.attributes.get("step_id", ""))
    except ValueError:
        return None
