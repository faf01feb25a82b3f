"""Spans under a data-plane frame's W3C context: recorded when a provider is installed,
skipped (and the context passed on untouched) when none is."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from opentelemetry import trace

from exegpt import tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
CARRIER = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}


def test_a_remote_child_span_joins_the_frames_trace(spans) -> None:
    # The test session installs an in-memory provider (tests/conftest.py).
    assert tracing.provider_installed()
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


def test_without_a_provider_no_span_is_made_and_the_frames_context_goes_on() -> None:
    # A fresh process: no provider, so the stage's hot path makes no span and attaches no
    # context, yet what it sends on carries the frame's context unchanged. Once a provider is
    # installed, the same call makes a recording span in the frame's trace.
    script = textwrap.dedent(
        f"""
        from opentelemetry import trace
        from exegpt import tracing
        from exegpt.transport import TensorMessage
        from services.worker.stage.onward import carry_on

        carrier = {CARRIER!r}
        tracer = trace.get_tracer("t")
        assert not tracing.provider_installed()
        received = TensorMessage("decode", {{}}, trace_context=carrier)
        out = TensorMessage("result", {{}})
        with tracing.remote_child_span(tracer, "stage.decode", carrier, {{}}):
            assert trace.get_current_span() is trace.INVALID_SPAN
            carry_on(received, out, load_id="l", elapsed_s=0.001, handoff=None)
        assert out.trace_context == carrier and out.trace_context is not carrier
        tracing.configure_tracing("exegpt-test", "console")
        assert tracing.provider_installed()
        with tracing.remote_child_span(tracer, "stage.decode", carrier, {{}}):
            span = trace.get_current_span()
            assert span.is_recording()
            assert f"{{span.get_span_context().trace_id:032x}}" == "{TRACE_ID}"
        print("ok", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "ok"
    # The console exporter printed the span at exit, in the frame's trace.
    assert '"name": "stage.decode"' in done.stdout and f"0x{TRACE_ID}" in done.stdout
