"""What engines report, and the bounded sliding windows the scheduler keeps of it."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class StageKind(StrEnum):
    """The kinds of cost an engine reports and the calibration corrects one by one."""

    ENCODE = "encode"  # encoder layers, or decoder layers running prefill
    DECODE = "decode"  # one generation step of decoder layers
    TRANSFER = "transfer"  # a hand-off of activations from one pipeline stage to the next
    OVERHEAD = "overhead"  # an engine step's host work beyond its forward (the serving path)


LAYER_KINDS = (StageKind.ENCODE, StageKind.DECODE)


@dataclass(frozen=True)
class StageTimeObservation:
    """The measured time of one kind of work for one batch.

    ENCODE and DECODE: one pipeline stage's `num_layers` layers. num_tokens is the input
    tokens of the batch for an encode, and the cached (self-attention) tokens summed over the
    batch for a decode step; num_cross_tokens is the encoder tokens summed over the batch
    (decode of an encoder-decoder model, else 0). TRANSFER: one hand-off of `num_tokens`
    tokens' activations between stages. OVERHEAD: one engine step's host time beyond its
    forward, for `batch_size` rows. num_layers is only checked for the layer kinds. An ENCODE
    of an encoder-decoder timed with its decoder layers (in process) also holds their first
    decode step: `num_first_step_layers` of them (0: the encode layers alone).
    """

    stage: StageKind
    batch_size: int
    num_tokens: int
    num_layers: int
    measured_s: float
    tp_degree: int = 1
    num_cross_tokens: int = 0
    num_first_step_layers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tp_degree < 1:
            raise ValueError("stage time: batch_size and tp_degree must be >= 1")
        if self.stage in LAYER_KINDS and self.num_layers < 1:
            raise ValueError(f"stage time: {self.stage} needs num_layers >= 1")
        if self.stage != StageKind.OVERHEAD and self.num_tokens < self.batch_size:
            raise ValueError("stage time: num_tokens must be at least one per sequence")
        if self.num_cross_tokens < 0:
            raise ValueError("stage time: num_cross_tokens must be >= 0")
        if self.num_first_step_layers < 0:
            raise ValueError("stage time: num_first_step_layers must be >= 0")
        if self.num_first_step_layers and self.stage != StageKind.ENCODE:
            raise ValueError("stage time: only an encode holds a first decode step")
        if not (math.isfinite(self.measured_s) and self.measured_s > 0):
            raise ValueError("stage time: measured_s must be positive and finite")


@dataclass(frozen=True)
class WorkloadObservations:
    """One report from an engine: lengths seen since its last report, and stage times."""

    replica_id: str = ""
    input_tokens: tuple[int, ...] = ()
    output_tokens: tuple[int, ...] = ()
    stage_times: tuple[StageTimeObservation, ...] = ()

    @property
    def num_items(self) -> int:
        return len(self.input_tokens) + len(self.output_tokens) + len(self.stage_times)

    def validate(self, *, max_items: int, max_length_tokens: int) -> None:
        if self.num_items > max_items:
            raise ValueError(
                f"report has {self.num_items} observations; the limit is {max_items} per report"
            )
        for label, lengths in (("input", self.input_tokens), ("output", self.output_tokens)):
            if lengths and (min(lengths) < 1 or max(lengths) > max_length_tokens):
                raise ValueError(
                    f"{label} lengths must be between 1 and {max_length_tokens} tokens"
                )


class LengthWindow:
    """The most recent `capacity` lengths of one dimension (input or output)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("window capacity must be >= 1")
        self._lengths: deque[int] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._lengths)

    def extend(self, lengths: Iterable[int]) -> None:
        self._lengths.extend(lengths)

    def clear(self) -> None:
        self._lengths.clear()

    def values(self) -> np.ndarray:
        return np.fromiter(self._lengths, dtype=np.int64, count=len(self._lengths))

    def pmf(self) -> np.ndarray:
        """P(S) of the window, indexed by length (index 0 unused)."""
        counts = np.bincount(self.values()).astype(np.float64)
        return counts / counts.sum()


@dataclass
class ObservationWindows:
    """Sliding windows of lengths and of measured / predicted stage-time ratios."""

    length_capacity: int
    stage_capacity: int
    inputs: LengthWindow = field(init=False)
    outputs: LengthWindow = field(init=False)
    stage_ratios: dict[StageKind, deque[float]] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = LengthWindow(self.length_capacity)
        self.outputs = LengthWindow(self.length_capacity)
        self.stage_ratios = {kind: deque(maxlen=self.stage_capacity) for kind in StageKind}

    def add_lengths(self, input_tokens: Sequence[int], output_tokens: Sequence[int]) -> None:
        self.inputs.extend(input_tokens)
        self.outputs.extend(output_tokens)

    def add_stage_ratio(self, stage: StageKind, ratio: float) -> None:
        self.stage_ratios[stage].append(ratio)

    def median_ratio(self, stage: StageKind) -> float | None:
        ratios = self.stage_ratios[stage]
        return float(np.median(np.fromiter(ratios, dtype=np.float64))) if ratios else None

    def clear_stage_ratios(self) -> None:
        for ratios in self.stage_ratios.values():
            ratios.clear()
