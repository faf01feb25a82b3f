"""A step's result frame, as the stage that ends the decoder sends it, read into a StepResult.

The frame carries the sampled `token_ids`, a `failed` flag per row and the logprob tensors,
with attributes for the stages' compute (`compute_s`, and `stage_s` per stage in route
order), the measured hand-offs and the first row error. An `error` frame fails every row;
so does a frame that does not fit the step (its own error says how): reading never raises.
"""

from __future__ import annotations

from exegpt.transport import TensorMessage
from services.worker.handoff import HANDOFFS_KEY, parse_handoffs
from services.worker.sampling import logprobs_from_tensors
from services.worker.step_plan import StepPlan, StepResult


def result_from_message(plan: StepPlan, message: TensorMessage) -> StepResult:
    """The result of `plan` that `message` reports (a failed one when it does not fit)."""
    compute_s = next(iter(_floats(message.attributes.get("compute_s", ""))), 0.0)
    if message.kind == "error":
        error = message.attributes.get("error", "a stage failed the step")
        return StepResult(
            plan.step_id,
            (-1,) * len(plan),
            (None,) * len(plan),
            f"engine error: {error}",
            compute_s=compute_s,
        )
    if "token_ids" not in message.tensors or "failed" not in message.tensors:
        return StepResult.failed(plan, "a stage returned a result without token_ids or failed")
    token_ids = message.tensors["token_ids"].tolist()
    failed = message.tensors["failed"].tolist()
    if len(token_ids) != len(plan) or len(failed) != len(plan):
        return StepResult.failed(plan, "a stage returned a result of the wrong size")
    row_error = message.attributes.get("row_error") or "the step failed for this request"
    errors = tuple(row_error if bad else None for bad in failed)
    stage_s = _floats(message.attributes.get("stage_s", ""))
    try:
        logprobs = logprobs_from_tensors(message.tensors, token_ids, list(plan.sampling))
    except (KeyError, ValueError) as exc:
        return StepResult.failed(plan, f"a stage returned bad logprobs: {exc}")
    return StepResult(
        plan.step_id, tuple(token_ids), errors, compute_s=compute_s, stage_s=stage_s,
        logprobs=tuple(logprobs),
        handoffs=parse_handoffs(message.attributes.get(HANDOFFS_KEY, "")),
    )  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part)
    except ValueError:
        return ()
