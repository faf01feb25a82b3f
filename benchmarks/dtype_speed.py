"""float32 against bfloat16, side by side in one run on one machine: the exegpt engine (in
process, continuous batching) and transformers `generate` (static batches), on the same
seeded forced-length requests, task-S-like (about 256 prompt tokens, 32 output tokens).

    python benchmarks/dtype_speed.py                     # ~2 minutes on a 2-core VM
    python benchmarks/dtype_speed.py --num-requests 128 --rounds 2

Every path runs a warm-up first (oneDNN builds its kernels on first use), then each round
times all four paths in turn, so a shared machine's drift hits them alike; the best round
of each is kept. Prints sequences/s, output tokens/s and the ratios that matter: bf16 over
float32 for each system, and exegpt over transformers in each dtype.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_generate import transformers_runner  # noqa: E402

from exegpt.dtypes import dtype_name  # noqa: E402
from exegpt.generation import SamplingParams  # noqa: E402
from exegpt.models.loader import load_model, save_default_model  # noqa: E402
from services.worker.config import EngineConfig  # noqa: E402
from services.worker.engine import EngineEvent, EngineRequest  # noqa: E402
from services.worker.server import build_engine  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def seeded_prompts(num: int, mean_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompt lengths spread +-25% around the mean, so batches carry some padding."""
    generator = torch.Generator().manual_seed(seed)
    low, high = int(mean_tokens * 0.75), int(mean_tokens * 1.25) + 1
    lengths = torch.randint(low, high, (num,), generator=generator).tolist()
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def exegpt_runner(model: str, dtype: torch.dtype, max_batch: int) -> Callable:
    loaded = load_model(model, dtype=dtype)

    def run(prompts: list[list[int]], output_lengths: list[int]) -> int:
        engine = build_engine(loaded, EngineConfig(max_batch_size=max_batch))
        done: list[int] = []
        finished = threading.Event()

        def on_event(event: EngineEvent) -> None:  # on the engine thread
            if event.error is not None:
                raise RuntimeError(event.error)
            if event.finish_reason is not None:
                done.append(1)
                if len(done) == len(prompts):
                    finished.set()

        for index, prompt in enumerate(prompts):  # all at once: saturation
            sampling = SamplingParams(
                max_tokens=output_lengths[index], temperature=0.0, ignore_eos=True
            )
            engine.submit(EngineRequest(f"r{index}", prompt, sampling, on_event))
        engine.start()
        try:
            if not finished.wait(600):
                raise RuntimeError("the engine did not finish in 600 s")
        finally:
            engine.stop()
        return sum(output_lengths)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="exegpt-tiny-t5", help="the embedded model (T5)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="mean prompt length")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="both systems' batch")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = seeded_prompts(args.num_requests, args.prompt_tokens, vocab=259)
    warmup = seeded_prompts(4, 32, vocab=259, seed=1)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = save_default_model(directory)
        runners: dict[str, Callable] = {}
        for dtype in DTYPES:
            name = dtype_name(dtype)
            runners[f"exegpt {name}"] = exegpt_runner(args.model, dtype, args.batch_size)
            runners[f"transformers {name}"] = transformers_runner(
                checkpoint, dtype, args.batch_size
            )
        for run in runners.values():
            run(warmup, [4] * len(warmup))
        best_s = {name: float("inf") for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run(prompts, [args.output_tokens] * len(prompts))
                best_s[name] = min(best_s[name], time.perf_counter() - start)
                sys.stderr.write(f"{name}: {best_s[name]:.1f} s\n")
    print_table(best_s, args)
    return 0


def print_table(best_s: dict[str, float], args: argparse.Namespace) -> None:
    seq_s = {name: args.num_requests / wall_s for name, wall_s in best_s.items()}
    print(
        f"{args.num_requests} requests, ~{args.prompt_tokens} prompt tokens, "
        f"{args.output_tokens} output tokens (forced), batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, best of {args.rounds} round(s)"
    )
    print(f"{'run':<24}{'wall s':>9}{'seq/s':>9}{'out tok/s':>11}")
    for name, wall_s in best_s.items():
        tokens_s = args.num_requests * args.output_tokens / wall_s
        print(f"{name:<24}{wall_s:>9.2f}{seq_s[name]:>9.2f}{tokens_s:>11.1f}")
    print("ratios (seq/s):")
    for system in ("exegpt", "transformers"):
        ratio = seq_s[f"{system} bfloat16"] / seq_s[f"{system} float32"]
        print(f"  {system} bfloat16 / float32: {ratio:.2f}")
    for name in ("float32", "bfloat16"):
        ratio = seq_s[f"exegpt {name}"] / seq_s[f"transformers {name}"]
        print(f"  exegpt / transformers, {name}: {ratio:.2f}")
    best = seq_s["exegpt bfloat16"] / seq_s["transformers float32"]
    print(f"  exegpt bfloat16 / transformers float32: {best:.2f}")


if __name__ == "__main__":
    sys.exit(main())
