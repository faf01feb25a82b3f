"""`exegpt demo` closes the loop with real processes: it deploys the first plan, calibrates a
copy of the profile from a calibration burst's engine clock, plans again at the same bound,
prices a deployed re-plan on its own steps (planning once more from them if it misses the
bound there), and measures the burst on the plan in force, which the replica itself
reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def _chosen(text: str) -> str:
    return re.search(r"chosen: (.+)", text).group(1).strip()


def test_demo_replans_after_calibration_and_measures_the_plan_in_force(
    measured_tiny_profile: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "demo",
        "--profile", str(measured_tiny_profile), "--profile-dir", str(tmp_path),
        "--burst", "16", "--max-tokens", "4",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    first_part, _, rest = out.partition("Calibration:")
    assert rest, out
    first = _chosen(first_part)
    assert "calibrated from" in rest
    assert "the first plan, calibrated, predicts" in rest
    if "Re-plan, on the calibrated profile:" in rest:
        in_force = re.findall(r"chosen: (.+)", rest)[-1].strip()  # a second re-plan's, if any
    else:
        assert "keeping the first plan" in rest
        in_force = first
    # The replica runs the plan in force, as it reports over GetSchedule.
    assert re.search(r"In force on replica 0 \(its GetSchedule\): (.+)", rest).group(1) == in_force
    # A re-plan deployed is priced on its own steps first; one that misses the bound on
    # them is planned once more from them, and that plan is deployed and priced in turn.
    replanned_again = "On its own steps it misses the bound; re-plan from them:" in rest
    applied = rest.count("Applying the re-plan")
    assert applied == (0 if in_force == first and not replanned_again else 1 + replanned_again)
    assert rest.count("the re-plan, calibrated on its own steps, predicts") == applied
    if applied:  # the burst is judged against the plan in force priced on its own steps
        own = re.findall(
            r"calibrated on its own steps, predicts ([\d.]+) seq/s and ([\d.]+) s", rest
        )
        seq_s = re.search(r"throughput \(seq/s\)\s+([\d.]+)", rest).group(1)
        latency_s = re.search(r"p99-length latency \(s\)\s+([\d.]+)", rest).group(1)
        assert (seq_s, latency_s) == own[-1]
    burst = re.search(r"schedule (.+) \((\d+) ok, (\d+) failed\)", rest)
    assert burst.group(1) == in_force
    assert (int(burst.group(2)), int(burst.group(3))) == (16, 0)
    assert "All services stopped" in out
