"""Continuous (iteration-level) batching, as Orca and vLLM run it: a request joins the running
batch at the next step boundary whenever a slot is free, and leaves as soon as it finishes."""

from __future__ import annotations

from services.worker.modes.base import FcfsMode


class ContinuousMode(FcfsMode):
    pass
