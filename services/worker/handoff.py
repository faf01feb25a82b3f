"""Measured hand-offs of activations between pipeline stages, for the scheduler's calibration
of the TRANSFER kind of cost.

A stage stamps every step it sends on with the wall clock (`sent_s`). The next stage, when it
receives a step that carries activations (`hidden`, or T5's `encoder_out`) and no handed-off
KV, takes the time from that stamp to the moment the frame is decoded: serialisation, the
ZeroMQ hop and deserialisation, what the cost model's `transfer_s` prices. It keeps the time
only when it was idle before the stamp; a step that arrived while the stage was busy waited
in its queue, and that wait is not transfer. Kept hand-offs ride with the step's result as
`handoffs` ("tokens:seconds" pairs, in route order) to the engine, which reports them.

Stamps are wall-clock (`time.time()`), so stages on hosts whose clocks disagree measure the
disagreement too; a negative or non-finite time is dropped, never reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch

SENT_KEY = "sent_s"
HANDOFFS_KEY = "handoffs"
ACTIVATION_KEYS = ("hidden", "encoder_out")


def stamp(attributes: dict[str, str]) -> None:
    """Mark a step as sent now (call just before sending it)."""
    attributes[SENT_KEY] = repr(time.time())


def activation_tokens(tensors: Mapping[str, torch.Tensor]) -> int:
    """Token rows of the activations a step carries (0: none, or it also carries KV)."""
    if any(key.startswith("kv.") for key in tensors):
        return 0
    for key in ACTIVATION_KEYS:
        tensor = tensors.get(key)
        if tensor is not None and tensor.dim() >= 1 and tensor.shape[-1] > 0:
            return tensor.numel() // tensor.shape[-1]
    return 0


def measured_handoff(
    attributes: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
    idle_since_s: float,
    received_s: float,
) -> tuple[int, float] | None:
    """(tokens, seconds) of the hand-off that brought this step, or None when it carried no
    activations, had no stamp, or was sent while this stage was still busy."""
    tokens = activation_tokens(tensors)
    try:
        sent_s = float(attributes.get(SENT_KEY, ""))
    except ValueError:
        return None
    took_s = received_s - sent_s
    if tokens < 1 or sent_s < idle_since_s or not (math.isfinite(took_s) and took_s > 0):
        return None
    return tokens, took_s


def append_handoff(attributes: dict[str, str], earlier: str, handoff: tuple[int, float] | None):
    """The step's hand-offs so far (`earlier`) plus this one, if measured, into `attributes`."""
    entries = [earlier] if earlier else []
    if handoff is not None:
        entries.append(f"{handoff[0]}:{handoff[1]!r}")
    if entries:
        attributes[HANDOFFS_KEY] = ",".join(entries)


def parse_handoffs(text: str) -> tuple[tuple[int, float], ...]:
    """`append_handoff`'s form back as (tokens, seconds) pairs; malformed entries dropped."""
    handoffs = []
    for entry in filter(None, text.split(",")):
        tokens_text, _, seconds_text = entry.partition(":")
        try:
            tokens, seconds = int(tokens_text), float(seconds_text)
        except ValueError:
            continue
        if tokens >= 1 and math.isfinite(seconds) and seconds > 0:
            handoffs.append((tokens, seconds))
    return tuple(handoffs)
