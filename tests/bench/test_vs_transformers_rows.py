"""benchmarks/vs_transformers.py's table: a line per exegpt max batch and one for
transformers, ratios against transformers' time, the engine's busy split over non-decode
forwards, decode forwards and host work, and the rows per non-decode step; MFU over the best
GEMM rate sampled in the run, with the lowest sample over it beside."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_transformers.py"
VS = runpy.run_path(str(SCRIPT), run_name="vs_transformers")


def test_rows_give_ratios_busy_split_and_rows_per_non_decode_step() -> None:
    engine_run, row_type, gemm_rate = VS["EngineRun"], VS["Row"], VS["GemmRate"]
    runs = (
        engine_run(32, 10.0, 0.9, (0.25, 0.5, 0.25), prefill_steps=4, prefill_rows=18),
        engine_run(64, 5.0, None, None, prefill_steps=0, prefill_rows=0),
    )
    row = row_type(
        model="llama", task="S", exegpt=runs, transformers_s=20.0, useful_flops=4e10,
        gemm=gemm_rate((4e10, 1e11, 8e10)), num_requests=40, output_tokens=800,
    )  # fmt: skip
    header, b32, b64, hf = VS["format_rows"]([row]).splitlines()
    assert "non-decode/decode/host, rows/non-decode" in header and "min/best" in header
    assert b32.split() == [
        "llama", "S", "exegpt", "b32", "4.00", "80.0", "2.00", "90%", "4.0", "100.0", "0.40",
        "4.0%",
        "25%/50%/25%,", "4.5",
    ]  # fmt: skip
    assert b64.split()[2:9] == ["exegpt", "b64", "8.00", "160.0", "4.00", "n/a", "8.0"]
    assert len(b64.split()) == 12  # no busy split where the worker lacks one
    assert hf.split()[2:7] == ["transformers", "2.00", "40.0", "1.00", "-"]


def test_the_gemm_rate_is_the_best_sample_and_its_spread_the_lowest_over_it() -> None:
    rate = VS["GemmRate"]((1.57e11, 4.18e11, 3.9e11))
    assert rate.best == 4.18e11
    assert rate.spread == 1.57e11 / 4.18e11
    assert VS["GemmRate"]((2e11,)).spread == 1.0
