"""One T5 decode step at batch 32 with skewed prompts (task-G-like: 4 of 128 tokens among 28
of 23-39, decoder histories of 10-199 tokens), for several bounds on a decode bucket's
padding, side by side in one run, in float32 and bfloat16. The bounds are shares of a bucket's
longest row alone: the allowance of a few keys that also lets short rows share a bucket is off
here (benchmarks/decode_buckets.py measures it).

    python benchmarks/t5_decode_step.py                  # t5-small shape, ~1 minute
    python benchmarks/t5_decode_step.py --steps 30

A bound of 1.0 puts every row in one bucket (each row masked to its own length, but every row
padded to the longest); 0.0 gives each distinct length its own kernel call; the model's
default sits between. Each step is timed in the thread's CPU time (one torch thread) and the
best is kept, so a shared machine's preemption does not count. Prints milliseconds per step
and the ratio to the one-bucket step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_transformers import MODELS, random_model  # noqa: E402

from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, SequenceKV  # noqa: E402
from exegpt.models.runner import ModelRunner  # noqa: E402
from exegpt.models.t5 import T5Model  # noqa: E402

BATCH = 32
BLOCK = 16
POOL_BLOCKS = 1024


def skewed_batch(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts (a few long, many short) and decoder prefixes of spread lengths."""
    generator = torch.Generator().manual_seed(1)
    lengths = [128] * 4 + torch.randint(23, 40, (BATCH - 4,), generator=generator).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    prefix_lengths = torch.randint(10, 200, (BATCH,), generator=generator).tolist()
    prefixes = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in prefix_lengths]
    return prompts, prefixes


@torch.inference_mode()
def step_ms(model: T5Model, dtype: torch.dtype, padding: float, steps: int) -> float:
    """Best CPU milliseconds of a decode step of the skewed batch under this padding bound."""
    model.decode_bucket_padding = padding
    model.decode_bucket_min_padding = 0
    spec = KVCacheSpec.for_model(model.config, dtype=dtype)
    runner = ModelRunner(model, KVCachePool(spec, POOL_BLOCKS, BLOCK, torch.device("cpu")))
    prompts, prefixes = skewed_batch(model.config.vocab_size)
    seqs = [SequenceKV() for _ in prompts]
    runner.prefill(seqs, prompts, prefixes)
    last = [5] * len(seqs)
    runner.decode(seqs, last)  # warm-up: oneDNN builds its kernels on first use
    best = float("inf")
    for _ in range(steps):
        start = time.thread_time()
        runner.decode(seqs, last)
        best = min(best, time.thread_time() - start)
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per bound")
    parser.add_argument("--bounds", default="1.0,0.5,0.25,0.0", help="padding bounds to compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bounds = [float(b) for b in args.bounds.split(",")]
    print(f"T5 decode step, batch {BATCH}, skewed prompts, 1 thread; default bound "
          f"{T5Model.decode_bucket_padding}; ratio = one-bucket (1.0) ms over this ms")  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(MODELS["t5"]).to(dtype)
        model.tie_weights()
        times = {bound: step_ms(model, dtype, bound, args.steps) for bound in bounds}
        reference = times.get(1.0)
        for bound, ms in times.items():
            ratio = f"{reference / ms:5.2f}x" if reference else "-"
            print(
                f"{str(dtype).removeprefix('torch.'):9s} bound {bound:4.2f}  {ms:7.2f} ms  {ratio}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
