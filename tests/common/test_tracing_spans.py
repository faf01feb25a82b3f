"""Spans under a data-plane frame's W3C context: recorded when a provider is installed,
skipped (and the context passed on untouched) when none is."""

from __future__ import annotations

import subprocess
import sys

from opentelemetry import trace

from exegpt import tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
CARRIER = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}


def test_a_remote_child_span_joins_the_frames_trace(spans) -> None:
    # The test session installs an in-memory provider (tests/conftest.py).
    assert tracing.recording()
    spans.clear()
    tracer = trace.get_tracer("test")
    with tracing.remote_child_span(tracer, "stage.decode", CARRIER, {"exegpt.step_id": "7"}):
        current = trace.get_current_span()
        assert current.is_recording()
    (span,) = spans.get_finished_spans()
    assert span.name == "stage.decode"
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.attributes["exegpt.step_id"] == "7"


def test_without_a_provider_no_span_is_made_until_one_is_installed() -> None:
    # A fresh process: no provider, so the hot path makes no span and attaches no context.
    script = (
        "from opentelemetry import trace\n"
        "from exegpt import tracing\n"
        "assert not tracing.recording()\n"
        f"with tracing.remote_child_span(trace.get_tracer('t'), 's', {CARRIER!r}, {{}}):\n"
        "    assert trace.get_current_span() is trace.INVALID_SPAN\n"
        "tracing.configure_tracing('exegpt-test', 'console')\n"
        "assert tracing.recording()\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
