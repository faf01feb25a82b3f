"""Causal prefill attention of equal-length fresh prompts (as packed_layout groups them),
side by side by batch and prompt length: SDPA's flash kernel against the blocked matmul kernel
(exegpt/models/prefill_attention.py) with its rows taken a few at a time under the scores
budget (what serving runs) and with every row in one block (the working set growing with
the batch).

    python benchmarks/prefill_attention.py                      # bf16, 12 heads over 4 of 64
    python benchmarks/prefill_attention.py --batches 1,8 --tokens 256,2048 --reps 2

Each path is timed in turn, `--reps` times, in the thread's CPU time (one torch thread), and
the best is kept: a shared machine's preemption does not count. Prints milliseconds and each
path's speed-up over flash.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from exegpt.models import prefill_attention
from exegpt.models.prefill_attention import causal_prefill_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import best_cpu_s  # noqa: E402


def blocked(budget: int) -> Callable[..., torch.Tensor]:
    """The blocked kernel run under a scores budget of `budget` elements."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        saved, prefill_attention.SCORES_BUDGET = prefill_attention.SCORES_BUDGET, budget
        try:
            return causal_prefill_attention(q, k, v, 0.125)
        finally:
            prefill_attention.SCORES_BUDGET = saved

    return run


def paths(batch: int, tokens: int, heads: tuple[int, int, int], dtype: torch.dtype) -> dict:
    """The three paths over the same random queries, keys and values."""
    num_heads, num_kv_heads, head_dim = heads
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, tokens, num_heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    bounded, unbounded = blocked(prefill_attention.SCORES_BUDGET), blocked(1 << 62)
    return {
        "flash": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=0.125,
            enable_gqa=True,
        ),  # fmt: skip
        "blocked, bounded": lambda: bounded(q, k, v),
        "blocked, all rows": lambda: unbounded(q, k, v),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--tokens", default="256,512,1024")
    parser.add_argument("--heads", default="12x4x64", help="query heads x KV heads x head dim")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    heads = tuple(int(x) for x in args.heads.split("x"))
    dtype = getattr(torch, args.dtype)
    budget = prefill_attention.SCORES_BUDGET
    print(f"causal prefill attention, {args.heads}, {args.dtype}, 1 thread, best of "
          f"{args.reps} (thread CPU ms); budget {budget} scores")  # fmt: skip
    print(f"{'batch':>6}{'tokens':>7}{'flash':>10}{'bounded':>10}{'all rows':>10}"
          f"{'x bounded':>11}{'x all rows':>12}")  # fmt: skip
    for tokens in (int(x) for x in args.tokens.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            best = best_cpu_s(paths(batch, tokens, heads, dtype), args.reps)
            flash, bounded, whole = best.values()
            times = f"{flash * 1e3:>10.1f}{bounded * 1e3:>10.1f}{whole * 1e3:>10.1f}"
            ratios = f"{flash / bounded:>11.2f}{flash / whole:>12.2f}"
            print(f"{batch:>6}{tokens:>7}{times}{ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
