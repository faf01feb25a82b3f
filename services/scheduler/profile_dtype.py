"""A profile's timings hold for one dtype: plan only for workers that run in it.

bfloat16 and float32 differ by up to 7x in GEMM speed on one CPU (issue 15), so a schedule
planned from a float32 profile for bfloat16 workers would be wrong in every number.
"""

from __future__ import annotations

from exegpt.cost_model import CostModel
from exegpt.dtypes import AUTO, check_dtype_name, detect_and_choose


def profile_dtype(cost_model: CostModel) -> tuple[str, str] | None:
    """(dtype, device) a measured profile was taken in; None for a model without one
    (analytic:DEVICE rooflines)."""
    data = getattr(cost_model, "data", None)
    model = getattr(data, "model", None)
    hardware = getattr(data, "hardware", None)
    if model is None or hardware is None:
        return None
    return str(model.dtype), str(hardware.device)


def check_profile_dtype(cost_model: CostModel, requested: str | None, name: str) -> str | None:
    """The dtype to plan for: `requested` (default: the profile's own), which must be the
    dtype the profile was measured in; ValueError saying what to do otherwise."""
    measured = profile_dtype(cost_model)
    if requested is None:
        return measured[0] if measured else None
    check_dtype_name(requested)
    if measured is None:
        raise ValueError(
            f"--dtype applies to a measured profile; {name} has no measured dtype (an analytic "
            "model assumes its own)"
        )
    dtype, device = measured
    wanted = requested
    if requested == AUTO:
        if device.startswith("cuda"):
            # This machine need not be the workers' GPU machine: no guessing there.
            raise ValueError("--dtype auto cannot be resolved for a CUDA profile here: name it")
        wanted = detect_and_choose(AUTO, device).name
    if wanted != dtype:
        shown = f"{requested} ({wanted} on this machine)" if requested == AUTO else requested
        raise ValueError(
            f"profile {name} was measured in {dtype}, but the workers run {shown}: profile "
            f"again with `exegpt profile --dtype {wanted}`, or plan for {dtype} workers"
        )
    return dtype
