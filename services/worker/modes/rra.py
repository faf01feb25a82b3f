"""RRA (round-robin allocation, ExeGPT section 4): every stage holds a slice of the encoder
and of the decoder, and the pipeline alternates one encoding of B_E queries with N_D decode
iterations of the running batch (capped at B_D).

B_E follows completions: each encoding admits as many queries as finished during the last
N_D iterations, so the decode batch stays at its planned size (while it is still filling, the
planned B_E tops it up towards B_D). The encoder workload is kept steady: the queries picked
for an encoding keep their total prompt tokens within a band (default +-20%) of B_E x the
planned mean input, passing over a query that would push it past the band's top; a query
passed over once is taken at the next encoding, so none waits more than one encoding. (The
band's bottom is not forced: an encoding of short queries stays short rather than wait.)
"""

from __future__ import annotations

from dataclasses import dataclass

from exegpt.schedule import Schedule
from services.worker.modes.base import FcfsMode, ModeView
from services.worker.requests import EngineRequest
from services.worker.waiting_queue import WaitingQueue


@dataclass(frozen=True)
class Encoding:
    """One encoding as it was decided, for stats and tests."""

    completed_before: int  # sequences that finished in the preceding N_D iterations
    num_running_before: int
    encode_batch_size: int  # B_E this encoding was allowed
    num_admitted: int
    num_prompt_tokens: int
    took_passed_over: bool  # admitted a query passed over at the previous encoding


class RraMode(FcfsMode):
    def __init__(self, schedule: Schedule, mean_input_tokens: float | None, band: float) -> None:
        super().__init__(1)  # RRA has no micro-batches: one batch traverses the pipeline
        self.planned_encode_batch_size = schedule.encode_batch_size
        self.decode_batch_size = schedule.decode_batch_size
        self.num_decode_iterations = schedule.num_decode_iterations
        self.mean_input_tokens = mean_input_tokens
        self.band = band
        self.encodings: list[Encoding] = []
        self._encoding = True
        self._num_decodes = 0
        self._completed = 0
        self._completed_before = 0
        self._chosen_tokens = 0
        self._passed_over: set[str] = set()
        self._took_passed_over = False
        self._limit = 0
        self._num_seen = 0
        self._seen_tokens = 0

    def admission_limit(self, view: ModeView) -> int:
        if view.num_running == 0:
            self._encoding = True  # nothing to decode: encode as soon as queries come
        if not self._encoding or view.num_prefilling:
            return 0
        room = self.decode_batch_size - view.num_running
        target = self._completed_before
        if view.num_running + target < self.decode_batch_size:  # filling up: the planned rate
            target = max(target, self.planned_encode_batch_size)
        limit = max(0, min(target, room))
        if limit == 0:  # nothing finished and the batch is full: this encoding is empty
            self.on_admitted(0, view)
        return limit

    def choose(self, waiting: WaitingQueue, limit: int) -> list[EngineRequest]:
        """Up to `limit` queries in the policy's order: first those passed over at the last
        encoding (up to `limit`), then each next one that keeps the prompt tokens within the
        band's top. Reads the queue lazily, up to the last query it takes (to its end when the
        band leaves the encoding short)."""
        self._limit = limit
        upper_tokens = limit * self._mean_input(waiting) * (1 + self.band)
        owed = [r for r in map(waiting.get, self._passed_over) if r is not None]
        owed_ids = {r.request_id for r in owed}
        num_owed = min(len(owed), limit)  # the first num_owed of them in order are taken
        total = sum(len(r.prompt_token_ids) for r in owed) if len(owed) <= limit else 0
        chosen: list[EngineRequest] = []
        passed: list[str] = []  # not taken, ahead of the last taken
        skipped: list[str] = []  # not taken since the last taken
        owed_seen = num_filled = 0
        for request in self.policy.order(waiting):
            full = num_owed + num_filled >= limit
            if full and owed_seen == num_owed:
                break
            num_tokens = len(request.prompt_token_ids)
            if request.request_id in owed_ids:  # one of the first num_owed: the loop ends
                take = True  # at the last of them when more are owed than `limit`
                owed_seen += 1
                total += num_tokens if len(owed) > limit else 0
            else:
                in_band = not (num_owed + num_filled) or total + num_tokens <= upper_tokens
                take = not full and in_band
                num_filled += take
                total += num_tokens if take else 0
            if take:
                chosen.append(request)
                passed += skipped
                skipped = []
            else:
                skipped.append(request.request_id)
        self._passed_over = set(passed)
        self._took_passed_over = bool(num_owed)
        self._chosen_tokens = total
        return chosen

    def on_admitted(self, num_admitted: int, view: ModeView) -> None:
        if not self._encoding:
            return
        if num_admitted:
            self.encodings.append(
                Encoding(
                    self._completed_before,
                    view.num_running,
                    self._limit,
                    num_admitted,
                    self._chosen_tokens,
                    self._took_passed_over,
                )
            )
        self._encoding = False
        self._num_decodes = self._completed = 0

    def may_decode(self, view: ModeView) -> bool:
        return not self._encoding and not view.num_prefilling

    def on_decoded(self, num_finished: int) -> None:
        self._num_decodes += 1
        self._completed += num_finished
        if self._num_decodes >= self.num_decode_iterations:
            self._encoding = True
            self._completed_before = self._completed

    def _mean_input(self, waiting: WaitingQueue) -> float:
        """The planned mean prompt length, or (without a plan's) the mean seen so far (over
        the queue at each encoding, from its kept totals)."""
        if self.mean_input_tokens:
            return self.mean_input_tokens
        self._num_seen += len(waiting)
        self._seen_tokens += waiting.prompt_tokens
        return self._seen_tokens / max(1, self._num_seen)
