"""StepJoin: a decode step's batch (from the engine) and hidden state (from the stage before)
become one step whichever comes first; what can never complete is dropped or refused."""

from __future__ import annotations

import time

import torch

from exegpt.transport import TensorMessage
from services.worker.stage.joins import StepJoin
from services.worker.wire import BATCH_KIND, BATCH_SENT


def batch(step: int) -> TensorMessage:
    return TensorMessage(
        BATCH_KIND,
        {"batch.tokens": torch.tensor([[step]]), "sampling.floats": torch.zeros(1, 4)},
        attributes={"step_id": str(step), "load_id": "L", BATCH_SENT: "1"},
    )


def hidden(step: int, compute_s: str = "0.5") -> TensorMessage:
    return TensorMessage(
        "decode",
        {"hidden": torch.full((1, 1, 4), float(step))},
        attributes={"step_id": str(step), "load_id": "L", BATCH_SENT: "1", "compute_s": compute_s},
    )


def test_batch_first_then_hidden_makes_the_whole_step() -> None:
    join = StepJoin()
    assert join.add_batch(batch(3)) is None
    joined = join.add_hidden(hidden(3), (32, 0.001))
    assert joined is not None
    message, handoff = joined
    assert message.kind == "decode"
    assert sorted(message.tensors) == ["batch.tokens", "hidden", "sampling.floats"]
    assert message.tensors["batch.tokens"].item() == 3
    assert message.attributes["compute_s"] == "0.5"  # the hidden state's route so far
    assert handoff == (32, 0.001)
    assert join.num_kept == 0 and join.refused == []


def test_hidden_first_waits_for_its_batch_and_keeps_its_handoff() -> None:
    join = StepJoin()
    assert join.add_hidden(hidden(5), (32, 0.002)) is None
    assert join.num_kept == 1
    message, handoff = join.add_batch(batch(5))
    assert message.tensors["hidden"][0, 0, 0].item() == 5.0
    assert "batch.tokens" in message.tensors
    assert handoff == (32, 0.002)
    assert join.num_kept == 0


def test_a_replayed_hidden_state_is_refused_and_the_next_step_still_joins() -> None:
    join = StepJoin()
    join.add_batch(batch(1))
    assert join.add_hidden(hidden(1)) is not None
    assert join.add_hidden(hidden(1)) is None  # its batch already ran
    assert [r.step_id for r in join.refused] == ["1"]
    assert "already ran" in join.refused[0].reason
    join.refused.clear()
    join.add_batch(batch(2))
    assert join.add_hidden(hidden(2)) is not None
    assert join.refused == []


def test_joining_a_step_drops_the_batches_of_earlier_steps() -> None:
    join = StepJoin()
    join.add_batch(batch(1))  # an earlier stage failed step 1: its hidden state never comes
    join.add_batch(batch(2))
    assert join.add_hidden(hidden(2)) is not None
    assert join.num_kept == 0
    assert join.add_hidden(hidden(1)) is None  # and if it came after all, it is refused
    assert [r.step_id for r in join.refused] == ["1"]


def test_a_hidden_state_without_a_batch_is_refused_after_the_wait() -> None:
    join = StepJoin(wait_s=0.05)
    assert join.add_hidden(hidden(7)) is None
    join.expire()
    assert join.refused == []  # not yet
    time.sleep(0.1)
    join.expire()
    assert [r.step_id for r in join.refused] == ["7"]
    assert "no batch came" in join.refused[0].reason
    assert join.num_kept == 0
    assert join.add_batch(batch(7)) is None  # too late: nothing is kept for it
    assert join.num_kept == 0


def test_what_is_kept_is_bounded() -> None:
    join = StepJoin(max_kept=2)
    for step in (10, 11, 12):
        join.add_hidden(hidden(step))
    assert join.num_kept == 2
    assert [r.step_id for r in join.refused] == ["10"]
    for step in (20, 21, 22):
        join.add_batch(batch(step))
    assert join.num_kept == 4  # two hidden states, two batches


def test_a_hidden_state_without_a_step_id_is_refused() -> None:
    join = StepJoin()
    message = hidden(1)
    del message.attributes["step_id"]
    assert join.add_hidden(message) is None
    assert [r.step_id for r in join.refused] == ["?"]


def test_reset_forgets_the_previous_load() -> None:
    join = StepJoin()
    join.add_batch(batch(1))
    join.add_hidden(hidden(4))
    join.reset()
    assert join.num_kept == 0
    join.add_batch(batch(1))  # step ids start again under a new load
    assert join.add_hidden(hidden(1)) is not None
