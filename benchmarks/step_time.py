"""One replica's step cost, in-process: a packed prefill and a batch-32 decode step of the
benchmark models (vs_transformers.py's t5-small shape and ~100M Llama with GQA), next to
transformers' own forward of the same decode step, in one run.

    python benchmarks/step_time.py                        # bf16, both models, ~1 minute
    python benchmarks/step_time.py --models llama --profile 15

The models run as serving runs them (bf16 Linears packed for oneDNN on a CPU, malloc's
thresholds set as a worker sets them: exegpt/allocator.py). Both paths, exegpt's and
transformers', run under those malloc thresholds (set once for the process), so the ratios
are not comparable with ones recorded before the thresholds were set here. The requests
are task S's seeded prompts (as `exegpt bench` sends them): the decode step's rows hold
their whole prompt in the KV cache. Each step is timed in the thread's CPU time on one torch
thread and the best of `--steps` is kept, so a shared machine's preemption does not count.
`--profile N` also prints torch.profiler's top N ops of one step of each kind (self CPU time),
and the step's Python time between ops (its wall time less the time inside ops).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_transformers import MODELS, random_model, seeded_requests  # noqa: E402

from exegpt.allocator import configure_allocator  # noqa: E402
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, SequenceKV  # noqa: E402
from exegpt.models.prepack import pack_linears  # noqa: E402
from exegpt.models.runner import ModelRunner  # noqa: E402

BLOCK = 16
POOL_BLOCKS = 1200


def best_ms(step: Callable[[], object], steps: int) -> float:
    """Best thread-CPU milliseconds of `step` over `steps` calls, after one warm-up."""
    step()  # oneDNN builds its kernels on first use
    best = float("inf")
    for _ in range(steps):
        start = time.thread_time()
        step()
        best = min(best, time.thread_time() - start)
    return best * 1e3


def profile(name: str, step: Callable[[], object], top: int) -> None:
    """Top ops of one call of `step` by self CPU time, and its time outside ops."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events)
    print(f"\n{name}: {wall_us / 1e3:.2f} ms wall (profiled), {calls} op calls, "
          f"{(wall_us - in_ops) / 1e3:.2f} ms outside ops")  # fmt: skip
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def exegpt_steps(model_name: str, dtype: torch.dtype, rows: int) -> dict[str, Callable]:
    """A prefill of the first `rows` task-S prompts and a decode step of those rows."""
    config = MODELS[model_name]
    model = random_model(config).to(dtype)
    model.tie_weights()
    pack_linears(model)
    spec = KVCacheSpec.for_model(config, dtype=dtype)
    runner = ModelRunner(model, KVCachePool(spec, POOL_BLOCKS, BLOCK, torch.device("cpu")))
    prompts = seeded_requests("S", rows, config).prompts
    decode_seqs = [SequenceKV() for _ in prompts]
    runner.prefill(decode_seqs, prompts)
    last = [5] * rows

    def prefill() -> None:
        seqs = [SequenceKV() for _ in prompts]
        runner.prefill(seqs, prompts)
        for seq in seqs:
            runner.release(seq)

    def decode() -> None:
        runner.decode(decode_seqs, last)
        for seq in decode_seqs:
            seq.num_self_tokens -= 1  # the same step again: history stays the prompt

    return {"prefill": prefill, "decode": decode}


def transformers_decode(model_name: str, dtype: torch.dtype, rows: int) -> Callable:
    """transformers' forward of one decode step over the same prompts (padded, cached)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from vs_transformers import save_random_model

    config = MODELS[model_name]
    directory = save_random_model(config, Path(tempfile.mkdtemp()) / model_name)
    seq2seq = config.family == "t5"
    loader = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = loader.from_pretrained(directory, dtype=dtype).eval()
    prompts = seeded_requests("S", rows, config).prompts
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    step_ids = torch.full((rows, 1), 5)
    with torch.inference_mode():
        if seq2seq:
            encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
            out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=step_ids)
        else:
            out = model(input_ids=ids, attention_mask=mask)
    cache = out.past_key_values
    step_mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)

    @torch.inference_mode()
    def decode() -> None:
        if seq2seq:
            model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=step_ids,
                  past_key_values=cache)  # fmt: skip
        else:
            model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache)
        # The same step again: the history stays the prompt.
        (cache.self_attention_cache if seq2seq else cache).crop(-1)

    return decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t5,llama")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, default=32, help="decode batch")
    parser.add_argument("--prefill-rows", type=int, default=8, help="prompts in the prefill")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of a step")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    configure_allocator()  # malloc as the workers set it (exegpt/allocator.py)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"step time, {args.dtype}, 1 thread, best of {args.steps} (thread CPU ms); "
          f"decode batch {args.rows}, prefill of {args.prefill_rows} task-S prompts")  # fmt: skip
    for name in args.models.split(","):
        steps = exegpt_steps(name, dtype, args.rows)
        prefill_steps = exegpt_steps(name, dtype, args.prefill_rows)
        decode_ms = best_ms(steps["decode"], args.steps)
        prefill_ms = best_ms(prefill_steps["prefill"], max(2, args.steps // 4))
        line = f"{name:6s} decode {decode_ms:8.2f} ms  prefill {prefill_ms:8.1f} ms"
        if not args.no_transformers:
            hf_ms = best_ms(transformers_decode(name, dtype, args.rows), args.steps)
            line += f"  transformers decode {hf_ms:8.2f} ms  ratio {hf_ms / decode_ms:.2f}x"
        print(line, flush=True)
        if args.profile:
            profile(f"{name} decode", steps["decode"], args.profile)
            profile(f"{name} prefill", prefill_steps["prefill"], args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
