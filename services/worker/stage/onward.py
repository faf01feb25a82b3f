"""What a stage's result carries on from the step it received: the step's identity, the
stages' times so far, the measured hand-offs and the W3C trace context.

The trace context is forwarded as received. A stage that records spans makes its own
`stage.<kind>` span a child of that context, and the next hop's span is its sibling under
the engine's `pipeline.<kind>` span; a stage with no tracer provider makes no span at all,
so the context it received is the only one it has to pass on.
"""

from __future__ import annotations

from exegpt.transport import TensorMessage
from services.worker.handoff import HANDOFFS_KEY, append_handoff, stamp


def carry_on(
    received: TensorMessage,
    out: TensorMessage,
    *,
    load_id: str,
    elapsed_s: float,
    handoff: tuple[int, float] | None,
) -> None:
    """Fill `out`'s attributes and trace context from `received`, and stamp it as sent now
    (call just before sending it). `elapsed_s` is this stage's own time on the step."""
    attributes = received.attributes
    previous_s = float(attributes.get("compute_s", "0") or 0)
    out.attributes.setdefault("step_id", attributes.get("step_id", "?"))
    out.attributes["load_id"] = load_id
    out.attributes["compute_s"] = repr(previous_s + elapsed_s)
    # Each stage's own time, in route order: the engine reports them for calibration.
    stage_times = attributes.get("stage_s", "")
    out.attributes["stage_s"] = f"{stage_times},{elapsed_s!r}" if stage_times else repr(elapsed_s)
    append_handoff(out.attributes, attributes.get(HANDOFFS_KEY, ""), handoff)
    out.trace_context = dict(received.trace_context)
    stamp(out.attributes)
