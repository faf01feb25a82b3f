"""What chunking costs a prefill, model alone: one prompt prefilled whole, then in chunks of
each budget (each chunk attending to the K/V its earlier ones cached), then as the same chunk
sizes with no prefix (each a fresh prefill): forwards only, one torch thread, best of
--repeats, side by side in one run.

    python benchmarks/chunk_cost.py --lengths 320,928 --budgets 32,64,128

It prints each sum of steps and its ratio to the whole prefill. `fresh` - `whole` is what the
extra steps cost by themselves (each step's fixed part: every layer's kernels once, the
weights read once, the step's index tensors) and the smaller matrices; `chunks` - `fresh` is
what reading the cached prefix costs (gathering its K/V and attending to it). The model is the
tiny Llama of benchmarks/two_level.py, on which the trace replays run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_level import build_tiny_llama  # noqa: E402

from exegpt.models.kv_cache import SequenceKV  # noqa: E402
from exegpt.models.loader import load_model  # noqa: E402
from exegpt.models.runner import ModelRunner  # noqa: E402


def pieces_s(runner: ModelRunner, prompt: list[int], budget: int, prefix: bool) -> float:
    """Seconds of the prompt's forwards in pieces of `budget` tokens; `prefix`: each piece a
    chunk after the earlier ones, else a fresh prefill of its own."""
    import torch

    pool, builder = runner.pool, runner.builder
    total_s = 0.0
    seq = SequenceKV()
    for start in range(0, len(prompt), budget):
        piece = prompt[start : start + budget]
        if not prefix:
            runner.release(seq)
        first = start if prefix else 0
        pool.allocator.grow([seq], pool.block_size_tokens, [first + len(piece)], None)
        began = time.perf_counter()
        with torch.inference_mode():
            runner.model.decode(builder.packed([seq], [piece], [first]), pool.layers)
        total_s += time.perf_counter() - began
        seq.num_self_tokens = first + len(piece)
    runner.release(seq)
    return total_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="320,928", help="prompt tokens")
    parser.add_argument("--budgets", default="32,64,128", help="chunk tokens")
    parser.add_argument("--repeats", type=int, default=10, help="best of this many")
    parser.add_argument("--block-size", type=int, default=16, help="KV block tokens")
    args = parser.parse_args()
    import torch

    from exegpt.models.kv_cache import KVCachePool, KVCacheSpec

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(str(build_tiny_llama(Path(tmp) / "tiny-llama")))
    lengths = [int(n) for n in args.lengths.split(",")]
    spec = KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype)
    num_blocks = -(-max(lengths) // args.block_size) + 1
    runner = ModelRunner(loaded.model, KVCachePool(spec, num_blocks, args.block_size))
    print("prompt  budget   whole ms   chunks ms (x whole)   fresh ms (x whole)")
    for length in lengths:
        prompt = [(7 * j) % 380 + 2 for j in range(length)]
        for budget in [int(b) for b in args.budgets.split(",")]:
            best = [float("inf")] * 3
            for _ in range(args.repeats):  # interleaved: the machine's noise falls on all three
                runs = (
                    pieces_s(runner, prompt, length, True),
                    pieces_s(runner, prompt, budget, True),
                    pieces_s(runner, prompt, budget, False),
                )
                best = [min(b, r) for b, r in zip(best, runs, strict=True)]
            whole, chunks, fresh = (s * 1e3 for s in best)
            print(
                f"{length:6d} {budget:7d} {whole:10.1f} {chunks:11.1f} ({chunks / whole:4.2f}x)"
                f" {fresh:12.1f} ({fresh / whole:4.2f}x)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
