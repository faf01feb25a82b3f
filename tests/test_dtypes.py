"""`--dtype`: names are checked in one place, and `auto` picks bfloat16 only where the device
computes it natively (decided from the CPU's flags or the GPU's compute capability)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from exegpt.dtypes import (
    DtypeError,
    check_dtype_name,
    choose_dtype,
    detect_and_choose,
    dtype_name,
    read_cpu_flags,
    resolve_dtype,
    torch_dtype,
)

# Flags as /proc/cpuinfo lists them on three real x86 parts.
SAPPHIRE_RAPIDS = frozenset("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split())
ZEN4 = frozenset("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni".split())
SKYLAKE_SP = frozenset("fpu sse2 avx2 avx512f avx512bw avx512_vnni".split())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(SAPPHIRE_RAPIDS, "bfloat16"), (ZEN4, "bfloat16"), (SKYLAKE_SP, "float32")],
)
def test_auto_on_a_cpu_follows_its_bf16_flags(flags: frozenset[str], expected: str) -> None:
    choice = choose_dtype("auto", "cpu", cpu_flags=flags)
    assert choice.name == expected
    if expected == "bfloat16":
        assert "avx512_bf16" in choice.reason
    else:
        assert "none of amx_bf16, avx512_bf16" in choice.reason


def test_auto_on_a_cpu_without_onednn_stays_float32() -> None:
    choice = choose_dtype("auto", "cpu", cpu_flags=SAPPHIRE_RAPIDS, onednn=False)
    assert choice.name == "float32" and "oneDNN" in choice.reason


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 5), "float32"), (None, "float32")],
)
def test_auto_on_cuda_needs_bf16_tensor_cores(
    capability: tuple[int, int] | None, expected: str
) -> None:
    assert choose_dtype("auto", "cuda", cuda_capability=capability).name == expected


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_a_named_dtype_is_taken_as_asked_whatever_the_machine(name: str) -> None:
    for device, flags in (("cpu", SKYLAKE_SP), ("cpu", SAPPHIRE_RAPIDS), ("cuda", frozenset())):
        assert choose_dtype(name, device, cpu_flags=flags, cuda_capability=(7, 0)).name == name
    assert dtype_name(torch_dtype(name)) == name


@pytest.mark.parametrize("name", ["int8", "fp32", "", "Auto"])
def test_unknown_names_are_refused_with_the_choices(name: str) -> None:
    with pytest.raises(DtypeError, match="use one of auto, float32, bfloat16, float16"):
        choose_dtype(name, "cpu")
    with pytest.raises(DtypeError):
        check_dtype_name(name)


def test_auto_is_not_a_torch_dtype() -> None:
    # Only the resolver turns `auto` into a dtype: a stage or a profile never sees it.
    with pytest.raises(DtypeError, match="use one of float32, bfloat16, float16"):
        torch_dtype("auto")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert read_cpu_flags(cpuinfo) == frozenset({"fpu", "avx512f", "avx512_bf16"})
    assert read_cpu_flags(tmp_path / "absent") == frozenset()


def test_resolving_auto_here_logs_the_choice_and_why(caplog: pytest.LogCaptureFixture) -> None:
    expected = detect_and_choose("auto", "cpu")
    with caplog.at_level(logging.INFO, logger="exegpt.dtypes"):
        dtype = resolve_dtype("auto", "cpu")
    assert dtype == torch_dtype(expected.name)
    assert f"dtype {expected.name} on cpu ({expected.reason})" in caplog.text
    # This machine's answer agrees with torch's own view of the CPU.
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (expected.name == "bfloat16") == (native_bf16 and torch.backends.mkldnn.is_available())
