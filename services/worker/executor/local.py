"""LocalExecutor: runs each plan at once on the whole model in this process."""

from __future__ import annotations

import collections
import logging
import time

import torch
from opentelemetry import trace

from exegpt.models.batch import BatchBuilder, PrefillBatch, ServingModel
from exegpt.models.kv_cache import KVCachePool
from services.worker.sampling import sample_rows
from services.worker.step_plan import StepPlan, StepResult

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("exegpt.engine")


class LocalExecutor:
    max_in_flight = 1

    def __init__(self, model: ServingModel, pool: KVCachePool) -> None:
        self._model = model
        self._pool = pool
        self._builder = BatchBuilder(
            model.config, pool.block_size_tokens, pool.null_slot, pool.device
        )
        self._done: collections.deque[StepResult] = collections.deque()

    @property
    def ahead_counts(self) -> tuple[int, int]:
        """Nothing is built ahead in process: every step builds its batch as it runs."""
        return 0, 0

    @property
    def num_in_flight(self) -> int:
        return len(self._done)

    def submit(self, plan: StepPlan) -> None:
        self._done.append(self._run(plan))

    def next_result(self, timeout_s: float) -> StepResult | None:
        return self._done.popleft() if self._done else None

    def healthy(self) -> bool:
        return True

    @property
    def placement(self) -> None:
        """One process holds the whole model: there is nothing to place."""
        return None

    def redeploy(self, placement: object) -> None:
        raise ValueError("an in-process replica has one device: it cannot take a placement")

    def close(self) -> None:
        self._done.clear()

    @torch.inference_mode()
    def _run(self, plan: StepPlan) -> StepResult:
        with tracer.start_as_current_span(
            f"engine.{plan.kind}",
            attributes={"exegpt.step_id": plan.step_id, "exegpt.batch_size": len(plan)},
            links=[trace.Link(context) for context in plan.trace_links],
        ):
            return self._step(plan)

    def _step(self, plan: StepPlan) -> StepResult:
        start_s = time.perf_counter()
        try:
            batch = plan.batch(self._builder)
            forward_start_s = time.perf_counter()
            if isinstance(batch, PrefillBatch):
                logits = self._model.prefill(batch, self._pool.layers)
            else:
                # Eager on purpose: torch.compile of the decode step compiled for minutes and
                # then ran slower here; compiling only the dense layer parts gained nothing
                # (they are GEMM time) and the attention ran 8x slower compiled
                # (docs/design.md, section 6, has the figures).
                logits = self._model.decode(batch, self._pool.layers)
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)  # the forward's time, not its launch
            forward_s = time.perf_counter() - forward_start_s
            sampled = sample_rows(logits, list(plan.sampling))
        except Exception as exc:  # the step's input broke the model: the engine isolates it
            logger.exception("step %d (%s of %d) failed", plan.step_id, plan.kind, len(plan))
            return StepResult.failed(plan, f"engine error: {exc}")
        return StepResult(
            plan.step_id,
            tuple(sampled.token_ids),
            tuple(sampled.errors),
            compute_s=time.perf_counter() - start_s,
            # The forward alone: batch building and sampling are host work, which the engine
            # clock reports as overhead (observations.py), so the two kinds stay disjoint.
            stage_s=(forward_s,),
            forward_s=forward_s,
            logprobs=tuple(sampled.logprobs or ()),
        )
