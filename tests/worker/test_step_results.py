"""A stage's result frame read into a StepResult (services/worker/executor/results.py): a
good frame gives its tokens, row errors, stage times, hand-offs and logprobs; an error frame,
a frame of the wrong size, one without its tensors or with bad logprobs fails every row of
the step with a message that says why, and never raises."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from exegpt.frames import TensorMessage
from services.worker.executor.results import result_from_message
from services.worker.step_plan import StepPlan
from tests.worker.test_decode_ahead import T5, Engine


def _plan(num_logprobs: int = -1) -> StepPlan:
    plan = Engine(T5, num_seqs=3).plan()
    rows = tuple(dataclasses.replace(r, num_logprobs=num_logprobs) for r in plan.sampling)
    return dataclasses.replace(plan, sampling=rows)


def _frame(tokens: list[int], failed: list[bool], **attributes: str) -> TensorMessage:
    tensors = {"token_ids": torch.tensor(tokens), "failed": torch.tensor(failed)}
    return TensorMessage("result", tensors, attributes=attributes)


def test_a_good_frame_gives_its_tokens_row_errors_times_and_handoffs() -> None:
    plan = _plan()
    message = _frame(
        [7, -1, 9],
        [False, True, False],
        compute_s="0.25",
        stage_s="0.1,0.15",
        row_error="out of blocks",
        handoffs="3:0.002",
    )
    result = result_from_message(plan, message)
    assert (result.step_id, result.token_ids, result.error) == (plan.step_id, (7, -1, 9), None)
    assert result.row_errors == (None, "out of blocks", None)
    assert (result.compute_s, result.stage_s, result.handoffs) == (0.25, (0.1, 0.15), ((3, 0.002),))
    assert result.logprobs == (None, None, None)


def test_an_error_frame_fails_every_row_with_the_stage_s_error() -> None:
    plan = _plan()
    message = TensorMessage("error", {}, attributes={"error": "CUDA OOM", "compute_s": "0.5"})
    result = result_from_message(plan, message)
    assert result.error == "engine error: CUDA OOM" and result.token_ids == (-1, -1, -1)
    assert result.compute_s == 0.5


@pytest.mark.parametrize(
    ("tokens", "failed"), [([7, 8], [False, False]), ([7, 8, 9], [False]), ([], [])]
)
def test_a_frame_of_the_wrong_size_fails_the_step(tokens, failed) -> None:
    result = result_from_message(_plan(), _frame(tokens, failed))
    assert result.error == "a stage returned a result of the wrong size"
    assert result.token_ids == (-1, -1, -1)


def test_a_frame_without_its_tensors_or_with_a_bad_time_fails_or_reads_zero() -> None:
    plan = _plan()
    result = result_from_message(plan, TensorMessage("result", {}))
    assert result.error is not None and "token_ids" in result.error
    result = result_from_message(plan, _frame([7, 8, 9], [False] * 3, compute_s="soon"))
    assert result.error is None and result.compute_s == 0.0


def test_bad_logprobs_fail_the_step_and_good_ones_are_read() -> None:
    plan = _plan(num_logprobs=1)
    message = _frame([7, 8, 9], [False] * 3)
    message.tensors["logprob.token"] = torch.tensor([-0.5, -1.0])  # one row short
    message.tensors["logprob.top_ids"] = torch.tensor([[7], [8]])
    message.tensors["logprob.top"] = torch.tensor([[-0.5], [-1.0]])
    result = result_from_message(plan, message)
    assert result.error == "a stage returned bad logprobs: logprobs of the wrong size"
    del message.tensors["logprob.top"]
    assert "bad logprobs" in (result_from_message(plan, message).error or "")
    message.tensors["logprob.token"] = torch.tensor([-0.5, -1.0, -2.0])
    message.tensors["logprob.top_ids"] = torch.tensor([[7], [8], [9]])
    message.tensors["logprob.top"] = torch.tensor([[-0.5], [-1.0], [-2.0]])
    good = result_from_message(plan, message)
    assert good.error is None
    assert [(lp.token_id, lp.logprob) for lp in good.logprobs] == [(7, -0.5), (8, -1.0), (9, -2.0)]
