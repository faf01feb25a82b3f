"""benchmarks/fidelity.py keeps going past a burst with no completed request: that run is a
row of NaN figures with a note saying why, and the summaries leave it out."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

from exegpt.bench.burst import CALIBRATION_S
from services.scheduler.simulate import PredictRequest, predict, workload_of

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


def test_a_calibration_pass_lasts_its_seconds_on_the_lengths_the_bench_sends() -> None:
    """Sized before the pass on the task's lengths as scaled for the bench: 5 s at the rate the
    profile predicts for them (task S at x0.25 runs about 3x the full-length rate here, which
    would size a pass of under 2 s)."""
    profile, schedule = (
        "analytic:h100-80gb:opt-13b",
        "continuous:encode_batch_size=8,decode_batch_size=8",
    )
    size = FIDELITY["pass_size"](profile, "S", schedule, 8, 0.25)
    scaled = PredictRequest(profile, "task:S", 1, schedule=schedule, length_scale=0.25)
    rate = predict(scaled)["predicted"]["throughput_seq_s"]
    full = predict(PredictRequest(profile, "task:S", 1, schedule=schedule))
    assert rate > 2 * full["predicted"]["throughput_seq_s"]
    # The seconds bind here: 2 x 8 rows and 64 decode steps of 8 rows at 8.4 tokens are fewer.
    assert size == math.ceil(CALIBRATION_S * rate)
    assert size * workload_of("task:S", 0.25, 1 << 30).mean_output_tokens / 8 > 64
