"""A decode step's attention (one query token per row) over a paged KV pool, side by side:
the kernels exegpt serves with (the native kernel reading the pool in place,
exegpt/models/paged_decode.py, and the torch path it falls back to, blocks gathered whole,
exegpt/models/decode_attention.py) and the paths they replaced, at batch 32 with the
benchmark models' head shapes.

    python benchmarks/decode_attention.py                 # bfloat16, KV lengths 100-200
    python benchmarks/decode_attention.py --kv 384,512 --batch 8 --shapes 32x8x128,32x32x128

Paths, for the same queries, pool and rows:

- `slots + sdpa`: every key's slot gathered, then `scaled_dot_product_attention` (before);
- `blocks + sdpa`: whole blocks gathered, then SDPA;
- `blocks + grouped bmm`: whole blocks gathered, K/V transposed to [b, H_kv, T, D], then two
  batched matmuls with each KV head's group of query heads as the rows (before);
- `blocks + block-diagonal`: whole blocks gathered, then `decode_kernel` (the torch path
  serving falls back to: the gathered [b, T, H_kv x D] rows against block-diagonal queries);
- `in place (native)`: `paged_decode`, each row's visible keys read from their slots in the
  pool, no copy (what bfloat16 serving runs on a CPU; not in a float32 run).

Each is timed in turn, `--reps` times, in the thread's CPU time (one torch thread), and the
best is kept: a shared machine's preemption does not count. Prints milliseconds and the
ratio to the first path.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from exegpt.models.block_gather import gather_blocks
from exegpt.models.decode_attention import decode_kernel
from exegpt.models.paged_decode import paged_decode

# query heads, KV heads, head dim: the benchmark models', then two of larger models
SHAPES = {
    "llama": (12, 4, 64),
    "t5": (8, 8, 64),
    "32x8x128": (32, 8, 128),
    "32x32x128": (32, 32, 128),
}
BLOCK = 16
POOL_BLOCKS = 4096


def grouped_bmm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """The decode kernel's previous matmul path: K/V transposed to [b, H_kv, T, D] (a copy each),
    each KV head's group of query heads the rows of one bmm, the softmax in float32."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
    keys = k.transpose(1, 2).contiguous()
    values = v.transpose(1, 2).contiguous()
    scores = torch.matmul(grouped, keys.transpose(2, 3)).float() * scale
    if mask.shape[1] != 1:  # per query head: [b, H, 1, T] -> [b, H_kv, G, T]
        mask = mask.reshape(batch, kv_heads, -1, mask.shape[-1])
    if mask.dtype == torch.bool:
        scores = torch.where(mask, scores, float("-inf"))
    else:
        scores += mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(batch, heads, dim)


def best_cpu_s(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - start)
    return best


@torch.inference_mode()
def paths(shape: str, batch: int, kv: tuple[int, int], dtype: torch.dtype) -> dict:
    heads, kv_heads, dim = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(POOL_BLOCKS * BLOCK, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.randint(kv[0], kv[1] + 1, (batch,), generator=generator)
    width = -(-int(lengths.max()) // BLOCK) * BLOCK
    blocks = torch.stack(
        [torch.randperm(POOL_BLOCKS, generator=generator)[: width // BLOCK] for _ in lengths]
    )  # scattered blocks, as in a served pool
    slots = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)  # [b, width]
    mask = (torch.arange(width)[None] < lengths[:, None])[:, None, None, :]
    q = torch.randn(batch, heads, dim, generator=generator).to(dtype)

    def sdpa(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=dim**-0.5, enable_gqa=heads != kv_heads,
        )  # fmt: skip

    def blocks_kv() -> tuple[torch.Tensor, torch.Tensor]:
        return gather_blocks(cache, blocks, BLOCK), gather_blocks(cache, blocks, BLOCK)

    ranges = torch.stack([torch.zeros_like(lengths), lengths], dim=1)
    runs = {
        "slots + sdpa": lambda: sdpa(cache[slots], cache[slots]),
        "blocks + sdpa": lambda: sdpa(*blocks_kv()),
        "blocks + grouped bmm": lambda: grouped_bmm(q, *blocks_kv(), mask, dim**-0.5),
        "blocks + block-diagonal": lambda: decode_kernel(q, *blocks_kv(), mask, dim**-0.5),
    }
    if dtype == torch.bfloat16:
        runs["in place (native)"] = lambda: paged_decode(
            q, cache, cache, blocks, ranges, None, BLOCK, dim**-0.5
        )
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kv", default="100,200", help="MIN,MAX KV length of the rows")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--shapes", default="llama,t5", help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    low, high = (int(n) for n in args.kv.split(","))
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"decode attention, {args.dtype}, batch {args.batch}, KV {low}-{high}, 1 thread")
    for shape in args.shapes.split(","):
        best = best_cpu_s(paths(shape, args.batch, (low, high), dtype), args.reps)
        base = next(iter(best.values()))
        for name, seconds in best.items():
            print(f"  {shape:<10}{name:<25}{seconds * 1e3:>9.3f} ms  {base / seconds:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
