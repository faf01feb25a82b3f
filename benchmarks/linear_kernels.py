"""One Linear at decode-sized batches, three ways, side by side: float32, plain bfloat16
(`F.linear`, which re-lays the weight out for oneDNN on every call) and bfloat16 with the
weight packed once (exegpt's `PackedLinear`, what bf16 serving on a CPU runs).

    python benchmarks/linear_kernels.py                    # the benchmark models' widths
    python benchmarks/linear_kernels.py --rows 1,4 --widths 4096x14336

Every kernel of a row is timed in turn, `--reps` times, and the best of each is kept, so a
shared machine's drift hits all three alike. Prints microseconds and the ratios to float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from exegpt.models.prepack import PackedLinear

# (in, out) of the t5-small and ~100M Llama shapes' FFN projections, and t5-small's head.
WIDTHS = "512x2048,2048x512,768x2048,2048x768,512x32128"


def best_s(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for fn in fns.values():  # oneDNN builds its kernels on first use
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure(in_features: int, out_features: int, rows: int, reps: int) -> dict[str, float]:
    linear = nn.Linear(in_features, out_features, bias=False)
    w32 = linear.weight.detach()
    w16 = w32.to(torch.bfloat16)
    packed = PackedLinear(linear.to(torch.bfloat16))
    x32 = torch.randn(rows, in_features)
    x16 = x32.to(torch.bfloat16)
    fns = {
        "float32": lambda: F.linear(x32, w32),
        "bf16": lambda: F.linear(x16, w16),
        "bf16 packed": lambda: packed(x16),
    }
    return best_s(fns, reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,32", help="M: tokens in the step")
    parser.add_argument("--widths", default=WIDTHS, help="INxOUT,... of the Linears")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    measure(512, 512, 1, 3)  # the first oneDNN calls of a process set up its thread pool
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.reps}")
    print(
        f"{'M':>3} {'in x out':<12}{'fp32 us':>9}{'bf16 us':>9}{'packed us':>11}"
        f"{'bf16/fp32':>11}{'packed/fp32':>13}"
    )
    for width in args.widths.split(","):
        in_features, out_features = (int(n) for n in width.split("x"))
        for rows in (int(m) for m in args.rows.split(",")):
            t = measure(in_features, out_features, rows, args.reps)
            fp32, bf16, packed = t["float32"], t["bf16"], t["bf16 packed"]
            print(
                f"{rows:>3} {width:<12}{fp32 * 1e6:>9.1f}{bf16 * 1e6:>9.1f}{packed * 1e6:>11.1f}"
                f"{bf16 / fp32:>11.2f}{packed / fp32:>13.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
