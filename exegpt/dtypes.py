"""The one parser of `--dtype` names and the one resolver of `auto`, shared by every command.

`auto` means bfloat16 where the device computes it fast: a CUDA GPU with bf16 tensor cores
(compute capability 8.0, Ampere, or newer), or a CPU with AMX-BF16 or AVX512-BF16 that
torch reaches through oneDNN. Anything else gets float32: bf16 emulated in float32 units is
slower than float32 itself.

torch is imported inside functions only, so commands that merely parse the flag (`exegpt up`,
`exegpt plan`) stay light.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

AUTO = "auto"
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DTYPE_CHOICES: tuple[str, ...] = (AUTO, *DTYPE_NAMES)
# float32 stays the default: it is token-identical to transformers in float32, which tests
# that start `exegpt up` without --dtype rely on. bf16 is no longer slower at small batches
# on CPUs: serving packs bf16 Linear weights once for oneDNN (exegpt/models/prepack.py), and
# packed bf16 then ran in 0.1-0.6x float32's time at M=1..32 on the development machine
# (benchmarks/linear_kernels.py), so `auto` is the fast choice a deployment opts into.
DEFAULT_DTYPE = "float32"
# /proc/cpuinfo flags of the x86 matrix and vector units that compute bf16 natively.
CPU_BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
# Ampere (sm_80) and newer have bf16 tensor cores; older GPUs emulate bf16.
MIN_CUDA_BF16_CAPABILITY = (8, 0)


class DtypeError(ValueError):
    """A dtype name that is not one of DTYPE_CHOICES (or `auto` where it cannot apply)."""


def check_dtype_name(name: str, *, allow_auto: bool = True) -> str:
    """`name` itself if it is a valid choice; DtypeError with the choices otherwise."""
    choices = DTYPE_CHOICES if allow_auto else DTYPE_NAMES
    if name not in choices:
        raise DtypeError(f"unsupported dtype {name!r}: use one of {', '.join(choices)}")
    return name


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # one of DTYPE_NAMES
    reason: str  # why, for the log line


def choose_dtype(
    requested: str,
    device_type: str,
    *,
    cpu_flags: frozenset[str] = frozenset(),
    onednn: bool = True,
    cuda_capability: tuple[int, int] | None = None,
) -> DtypeChoice:
    """The dtype to run in. Pure: the caller detects the machine (`detect_and_choose`)."""
    check_dtype_name(requested)
    if requested != AUTO:
        return DtypeChoice(requested, "asked for")
    if device_type == "cuda":
        if cuda_capability is None:
            return DtypeChoice("float32", "auto: CUDA device capability unknown")
        shown = f"sm_{cuda_capability[0]}{cuda_capability[1]}"
        if cuda_capability >= MIN_CUDA_BF16_CAPABILITY:
            return DtypeChoice("bfloat16", f"auto: CUDA {shown} has bf16 tensor cores")
        return DtypeChoice("float32", f"auto: CUDA {shown} has no bf16 tensor cores")
    if device_type != "cpu":
        return DtypeChoice("float32", f"auto: no bf16 detection for device type {device_type!r}")
    found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags]
    if not found:
        return DtypeChoice("float32", f"auto: the CPU has none of {', '.join(CPU_BF16_FLAGS)}")
    if not onednn:
        return DtypeChoice("float32", f"auto: the CPU has {found[0]} but torch lacks oneDNN")
    return DtypeChoice("bfloat16", f"auto: the CPU has {', '.join(found)}")


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


def detect_and_choose(requested: str, device: str = "cpu") -> DtypeChoice:
    """choose_dtype() fed with this machine's CPU flags or the CUDA device's capability."""
    import torch

    check_dtype_name(requested)
    if requested != AUTO:
        return choose_dtype(requested, torch.device(device).type)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        capability = None
        if torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(torch_device)
        return choose_dtype(AUTO, "cuda", cuda_capability=capability)
    return choose_dtype(
        AUTO,
        torch_device.type,
        cpu_flags=read_cpu_flags(),
        onednn=torch.backends.mkldnn.is_available(),
    )


def resolve_dtype(requested: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype for `requested` on `device`; logs what `auto` chose and why."""
    choice = detect_and_choose(requested, device)
    if requested == AUTO:
        logger.info("dtype %s on %s (%s)", choice.name, device, choice.reason)
    return torch_dtype(choice.name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a concrete name (not `auto`)."""
    import torch

    check_dtype_name(name, allow_auto=False)
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", the form profiles and stage requests carry."""
    return str(dtype).removeprefix("torch.")
