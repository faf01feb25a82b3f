"""A measured profile's structure with hand-made timings: the same model, grid points and
memory sizes, but every time a fixed linear cost of the sizes, so that a plan made on it is the
same on a quiet machine and on a loaded one.

A really measured tiny profile times a 2 x 2 grid in about a second; a disturbed point there
tilts the planner's extrapolation to batches of hundreds (a test once saw an automatic bound of
1028 s). Tests whose assertions depend on where the bound falls plan on this profile instead.

Parts: `fixed + per_unit * size` (series) and `fixed + per_row * batch + per_cell * batch *
size` (surfaces), divided by the TP degree. Whole forwards are the sum of their parts, so the
profile's reconciliation factors are exactly 1 (exegpt/profile/reconcile.py).
"""

from __future__ import annotations

from typing import Any

from exegpt.profile.format import ProfileData
from exegpt.profile.layer_profile import LayerProfile

# name -> (fixed_s, per_unit_s): per token, per row or per byte.
SERIES = {
    "encode_rest": (2e-4, 1.5e-5),
    "cross_kv_write": (2e-5, 1e-6),
    "decode_rest": (3.5e-4, 2e-5),
    "embedding": (1e-5, 1e-7),
    "lm_head": (1e-4, 1e-5),
    "comm": (5e-5, 1e-9),
}
# name -> (fixed_s, per_row_s, per_row_and_token_s)
SURFACES = {
    "encode_attention": (3e-5, 5e-6, 1e-6),
    "decode_self_attention": (4e-5, 5e-6, 5e-8),
    "decode_cross_attention": (4e-5, 5e-6, 5e-8),
}


def _series(series: dict[str, Any], fixed: float, per_unit: float) -> dict[str, Any]:
    times = [fixed + per_unit * size for size in series["sizes"]]
    return {**series, "median_s": times, "p10_s": times, "p90_s": times}


def _surface(surface: dict[str, Any], fixed: float, per_row: float, per_cell: float) -> dict:
    rows = []
    for row in surface["rows"]:
        batch = row["batch_size"]
        rows.append(_series(row, fixed + per_row * batch, per_cell * batch))
    return {"rows": rows}


def _compute(compute: dict[str, Any], tp: int) -> dict[str, Any]:
    steady = dict(compute)
    for name, (fixed, per_unit) in SERIES.items():
        if compute.get(name) is not None:
            steady[name] = _series(compute[name], fixed / tp, per_unit / tp)
    for name, (fixed, per_row, per_cell) in SURFACES.items():
        if compute.get(name) is not None:
            steady[name] = _surface(compute[name], fixed / tp, per_row / tp, per_cell / tp)
    return steady


def _comm(comm: dict[str, Any]) -> dict[str, Any]:
    fixed, per_byte = SERIES["comm"]
    series = _series(comm["series"], fixed, per_byte)
    return {"series": series, "fit": {"latency_s": fixed, "bytes_per_s": 1.0 / per_byte}}


def _wholes(raw: dict[str, Any], name: str, parts: Any) -> dict[str, Any]:
    """`raw[name]` (a whole-forward surface) with each point set to `parts(batch, size)`."""
    rows = []
    for row in raw[name]["rows"]:
        times = [parts(row["batch_size"], size) for size in row["sizes"]]
        rows.append({**row, "median_s": times, "p10_s": times, "p90_s": times})
    return {**raw, name: {"rows": rows}}


def steady_timings(data: ProfileData) -> ProfileData:
    """`data` with every timing replaced by the hand-made costs above (no serving section)."""
    raw = data.model_dump()
    raw["compute"] = {tp: _compute(c, tp) for tp, c in raw["compute"].items()}
    for name in ("embedding", "lm_head"):
        raw[name] = _series(raw[name], *SERIES[name])
    raw["transfer"] = _comm(raw["transfer"])
    raw["allreduce"] = {tp: _comm(c) for tp, c in raw["allreduce"].items()}
    raw["serving"] = None
    # Decode wholes first: an encoder-decoder prefill's whole includes a reconciled decode step.
    parts = LayerProfile(ProfileData.model_validate(raw))
    raw = _wholes(raw, "decode_whole", parts.decode_parts_s)
    parts = LayerProfile(ProfileData.model_validate(raw))
    raw = _wholes(
        raw,
        "prefill_whole",
        lambda b, s: parts.prefill_parts_s(b, s) + parts.prefill_first_step_s(b, s),
    )
    return ProfileData.model_validate(raw)
