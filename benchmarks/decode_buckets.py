"""A batch-32 decode step over task S's prompts, for several allowances of a decode bucket's
padding in keys (`DECODE_BUCKET_MIN_PADDING`, exegpt/models/decode_buckets.py), side by side.

    python benchmarks/decode_buckets.py                  # bf16, both models, ~2 minutes
    python benchmarks/decode_buckets.py --models llama --allowances 0,64,128,256

Task S's histories (3-511 tokens) cut by the 25% bound alone make ten buckets per layer for
the Llama shape, six of them one or two rows of a few blocks; each bucket costs a dozen small
kernel calls per layer whatever its size. A larger allowance merges them, at the price of
padded keys. The model, requests and step are step_time.py's. The allowances take turns
step by step in one process (each step timed in the thread's CPU time on one torch thread,
the best of `--steps` kept), so drifting load on a shared machine hits them alike. Prints
milliseconds per step, its buckets (all layers) and the ratio to the first allowance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import exegpt_steps  # noqa: E402

import exegpt.models.attention as attention  # noqa: E402
import exegpt.models.decode_buckets as buckets  # noqa: E402
import exegpt.models.packed as packed  # noqa: E402


def buckets_per_step(decode: object, allowance: int) -> int:
    """Decode buckets of the step under this allowance, over all its layers."""
    calls: list[int] = []
    real = packed.attend_buckets

    def counting(*args: object) -> None:
        calls.append(len(args[4]))  # type: ignore[arg-type]
        real(*args)  # type: ignore[arg-type]

    # packed steps (Llama) look it up in packed, T5 decode steps in attention
    packed.attend_buckets = attention.attend_buckets = counting
    try:
        buckets.DECODE_BUCKET_MIN_PADDING = allowance
        decode()  # type: ignore[operator]
    finally:
        packed.attend_buckets = attention.attend_buckets = real
    return sum(calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama,t5")
    parser.add_argument("--allowances", default="0,64,128,256", help="padding allowances, keys")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per allowance")
    args = parser.parse_args()
    torch.set_num_threads(1)
    allowances = [int(a) for a in args.allowances.split(",")]
    default = buckets.DECODE_BUCKET_MIN_PADDING
    print(f"decode step, bfloat16, batch 32, task-S prompts, 1 thread, best of {args.steps}; "
          f"default {default} keys; ratio = first allowance's ms over this ms")  # fmt: skip
    for name in args.models.split(","):
        decode = exegpt_steps(name, torch.bfloat16, 32)["decode"]
        best = dict.fromkeys(allowances, float("inf"))
        try:
            counts = {a: buckets_per_step(decode, a) for a in allowances}
            for _ in range(args.steps):
                for allowance in allowances:
                    buckets.DECODE_BUCKET_MIN_PADDING = allowance
                    start = time.thread_time()
                    decode()
                    best[allowance] = min(best[allowance], time.thread_time() - start)
        finally:
            buckets.DECODE_BUCKET_MIN_PADDING = default
        first = best[allowances[0]]
        for allowance, seconds in best.items():
            print(f"  {name:6s} allowance {allowance:4d} keys  {counts[allowance]:4d} buckets  "
                  f"{seconds * 1e3:8.2f} ms  {first / seconds:5.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
