"""Decode attention read straight from the paged KV pool, by a small C kernel (paged_decode.c).

Without it, a bfloat16 decode step on a CPU gathers each bucket's K/V blocks into a fresh copy,
zeroes the stale tail of each row's last block and runs two batched matmuls over the copy with
the queries laid out block-diagonally (decode_buckets.py, decode_attention.py): K and V are moved
three times and the matmuls do H_kv times the useful work. On this project's development VM (an
AMD EPYC with AVX512-BF16 and no AMX) that attention was 47% of a ~100M Llama decode step at 128
rows (torch.profiler: bmm 29%, index_select 12%, index_fill 3%; benchmarks/step_time.py). The C
kernel reads each visible key's K and V once, from its slot, in float32 arithmetic, and touches no
padding and no stale slot: benchmarks/decode_attention.py compares the two.

The kernel is compiled on first use with the machine's C compiler (`cc`, or $CC) for this CPU
(-O3 -march=native, OpenMP across rows) into a cache directory ($EXEGPT_KERNEL_CACHE, default
~/.cache/exegpt/kernels), keyed by the source, the flags and the CPU's feature flags, and loaded
with ctypes (the call releases the GIL). Where no compiler works the step keeps the torch path,
with one warning in the log; EXEGPT_NATIVE_DECODE=0 keeps it on purpose. It serves bfloat16 on a
CPU only: float32 keeps SDPA (token-identical to transformers) and GPUs keep their kernels.

Accuracy: scores, softmax and the weighted sum run in float32 and only the output is rounded to
bfloat16, where the torch path also rounds the scores and the softmax weights to bfloat16, so
this kernel is the closer of the two to float32 attention (tests/models/test_paged_decode.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
_OPENMP = ("-fopenmp",)
_NO_OPENMP = ("-fopenmp-simd",)  # vectorize the simd loops without the OpenMP runtime

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where compiled kernels are kept ($EXEGPT_KERNEL_CACHE, default ~/.cache/exegpt/kernels)."""
    configured = os.environ.get("EXEGPT_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "exegpt" / "kernels"


def enabled() -> bool:
    """False where EXEGPT_NATIVE_DECODE=0 asks for the torch path."""
    return os.environ.get("EXEGPT_NATIVE_DECODE", "1") != "0"


def reads_the_pool(q: Tensor, cache_k: Tensor) -> bool:
    """Whether decode queries `q` over the pool `cache_k` take this kernel: both bfloat16 in
    host memory, contiguous pools, the kernel enabled and built."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and _serves(cache_k)


def bias_dtype(pool: Tensor | None) -> torch.dtype | None:
    """The dtype to build a decode step's additive bias over `pool` in: float32 where this
    kernel reads the pool (it adds the bias in float32 and takes one built so as it is, where
    one in the model's dtype would be converted again in every layer); None elsewhere: the
    model's own."""
    return torch.float32 if pool is not None and _serves(pool) else None


def _serves(cache_k: Tensor) -> bool:
    return (
        cache_k.device.type == "cpu"
        and cache_k.dtype == torch.bfloat16
        and cache_k.is_contiguous()
        and enabled()
        and library() is not None
    )


def prepare(dtype: torch.dtype, device: torch.device) -> bool:
    """Build (or load) the kernel now where a model of `dtype` on `device` decodes through it,
    so that the first decode step does not wait for the compiler; returns whether it does."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not enabled():
        return False
    return library() is not None


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load(_build())
            except (OSError, subprocess.SubprocessError) as exc:
                logger.warning(
                    "the native decode kernel could not be built (%s); decode attention "
                    "keeps the torch path",
                    exc,
                )
            _tried = True
    return _library


def paged_decode(
    q: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    key_blocks: Tensor,
    key_ranges: Tensor,
    bias: Tensor | None,
    block_size: int,
    scale: float,
    query_index: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + bias) v for one query token per row: row r over its keys
    key_ranges[r, 0] .. key_ranges[r, 1] - 1, key t in block key_blocks[r, t // block_size] of
    the pools [slots, H_kv, D]. `bias`: None or additive [b, H | 1, 1 | T] (read at each
    visible key's column).

    Without `query_index`, q is [b, H, D] and a new [b, H, D] is returned. With it ([b]
    distinct token indices), row r's query is q[query_index[r]] of q [N, H, D], and its output
    is written to out[query_index[r]] of `out` (q's shape and dtype; the other rows are left as
    they are), which is returned: a step's rows are read and written in place, with no gather
    or scatter around the call."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native decode kernel is not built")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = cache_k.shape[1]
    if num_heads % num_kv_heads or cache_k.shape[2] != head_dim or cache_v.shape != cache_k.shape:
        raise ValueError(f"queries {tuple(q.shape)} do not match the pool {tuple(cache_k.shape)}")
    # The kernel trusts what it is given (C, no bounds checks): every shape and dtype it
    # relies on is checked here, on metadata only. The values (ranges within the blocks,
    # distinct indices within q) are the caller's: decode_buckets.py builds them so.
    if not (q.dtype == cache_k.dtype == cache_v.dtype == torch.bfloat16):
        raise ValueError("the kernel reads bfloat16 queries and pools")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("the pools must be contiguous")
    q = q.contiguous()
    blocks = key_blocks.to(torch.int64).contiguous()
    ranges = key_ranges.to(torch.int32).contiguous()
    rows = blocks.shape[0]
    if ranges.shape != (rows, 2):
        raise ValueError(f"key_ranges {tuple(ranges.shape)} is not one (first, end) per row")
    index = None
    if query_index is None:
        if q.shape[0] != rows:
            raise ValueError(f"{q.shape[0]} queries for {rows} rows of keys")
        out = torch.empty_like(q)
    else:
        index = query_index.to(torch.int64).contiguous()
        if out is None or out.shape != q.shape or out.dtype != q.dtype or index.shape != (rows,):
            raise ValueError("an indexed call needs `out` like q and one index per row")
        if not out.is_contiguous():
            raise ValueError("`out` must be contiguous")
    bias_heads = bias_stride = 0
    if bias is not None:
        bias = bias.reshape(bias.shape[0], bias.shape[1], -1).to(torch.float32)
        bias = bias.expand(rows, -1, -1).contiguous()
        bias_heads, bias_stride = bias.shape[1], bias.shape[2]
        if bias_heads not in (1, num_heads) or bias_stride < blocks.shape[1] * block_size:
            raise ValueError(
                f"bias {tuple(bias.shape)} does not cover {num_heads} heads (or 1) over "
                f"{blocks.shape[1] * block_size} keys"
            )
    status = lib.exegpt_paged_decode_bf16(
        q.data_ptr(), index.data_ptr() if index is not None else None, cache_k.data_ptr(),
        cache_v.data_ptr(), blocks.data_ptr(), blocks.shape[1], ranges.data_ptr(),
        bias.data_ptr() if bias is not None else None, bias_heads, bias_stride, out.data_ptr(),
        rows, num_heads, num_kv_heads, head_dim, block_size, scale, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the native decode kernel could not allocate its scratch")
    return out


def _build() -> Path:
    """The compiled kernel's path, compiling it unless the cache holds this build."""
    configured = shlex.split(os.environ.get("CC", ""))  # e.g. CC="ccache gcc"
    found = shutil.which("cc") or shutil.which("gcc")
    compiler = configured or ([found] if found else [])
    if not compiler:
        raise OSError("no C compiler (cc, gcc or $CC) found")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join((*compiler, *_FLAGS, platform.machine(), _cpu_flags())).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        errors = []
        for extra in (_OPENMP, _NO_OPENMP):
            command = [*compiler, *_FLAGS, *extra, str(SOURCE), "-o", str(built), "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent builder finds a whole file
                logger.info("built the native decode kernel: %s", " ".join(command))
                return target
            errors.append(done.stderr.strip()[-400:])
    raise OSError(f"{' '.join(compiler)} failed: {' | '.join(errors)}")


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), or '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    function = lib.exegpt_paged_decode_bf16
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [
        pointer, pointer, pointer, pointer, pointer, int64, pointer, pointer, int64, int64,
        pointer, int64, int64, int64, int64, int64, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    function.restype = ctypes.c_int
    lib.exegpt_paged_decode_openmp.argtypes = []
    lib.exegpt_paged_decode_openmp.restype = ctypes.c_int
    return lib


def splits_rows() -> bool:
    """Whether the built kernel splits a call's rows among OpenMP threads (False: it was
    built without OpenMP, or not at all)."""
    lib = library()
    return lib is not None and bool(lib.exegpt_paged_decode_openmp())
