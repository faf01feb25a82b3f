"""benchmarks/fidelity.py keeps going past a burst with no completed request: that run is a
row of NaN figures with a note saying why, and the summaries leave it out."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity.py"
FIDELITY = runpy.run_path(str(SCRIPT), run_name="fidelity")


def _document(errors: list[str | None]) -> dict:
    requests = [
        {"error": error, "input_tokens": 10, "output_tokens": 0 if error else 5} for error in errors
    ]
    return {"requests": requests, "metrics": {"num_failed": sum(e is not None for e in errors)}}


def test_a_burst_with_no_completed_request_is_a_nan_row_with_a_note() -> None:
    failed = _document(["HTTP 429: request queue is full", "HTTP 503: no healthy replica"] * 2)
    note = FIDELITY["no_completions"](failed, "measured")
    assert note == (
        "no request of the measured burst completed (HTTP 429: request queue is full; "
        "HTTP 503: no healthy replica): nothing to predict on"
    )
    assert FIDELITY["no_completions"](_document(["HTTP 429: full", None]), "measured") is None

    run = FIDELITY["unmeasured_run"]("S", "static", 8, 4, failed, note)
    assert math.isnan(run.measured_seq_s) and math.isnan(run.seq_error)
    assert run.num_failed == 4
    printed = FIDELITY["row"](run)
    assert printed.splitlines()[1].strip() == note
    assert printed.split()[:4] == ["S", "static", "8", "4"]
    assert FIDELITY["summary"]("seq/s", [run.seq_error]) == "seq/s: no measurement"
    assert FIDELITY["summary"]("seq/s", [run.seq_error, 0.05]).startswith(
        "seq/s: median |error| 5.0%"
    )


def test_a_row_names_its_calibration_pass_size_and_what_it_corrected() -> None:
    run = FIDELITY["unmeasured_run"]("S", "continuous", 16, 128, _document([None]), "")
    calibrated = "calibrated from 300 observations (decode x1.90 from 140)"
    sized = FIDELITY["Run"](**{**vars(run), "calibration": calibrated, "calibration_requests": 329})
    assert FIDELITY["row"](sized).splitlines()[1].strip() == f"pass of 329 requests: {calibrated}"
    unsized = FIDELITY["Run"](**{**vars(run), "calibration": "uncalibrated"})
    assert FIDELITY["row"](unsized).splitlines()[1].strip() == "uncalibrated"
