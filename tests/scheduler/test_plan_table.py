"""benchmarks/plan_table.py runs end to end (one task, no exhaustive pass, analytic profile)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_table.py"


def test_plan_table_prints_a_row_per_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = runpy.run_path(str(SCRIPT), run_name="plan_table")["main"]
    rows_path = tmp_path / "rows.json"
    argv = ["--profile", "analytic:cpu", "--tasks", "S", "--no-exhaustive"]
    assert main([*argv, "--json", str(rows_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| S |") == 2 and "vs static" in out
    rows = json.loads(rows_path.read_text())
    tight, loose = rows
    assert tight["latency_bound_s"] < loose["latency_bound_s"]
    for row in rows:
        assert row["latency_s"] <= row["latency_bound_s"]
        assert row["bnb_evaluations"] > 0 and row["static_seq_s"] > 0
    assert main(["--profile", "/no/such/profile.json"]) == 2
