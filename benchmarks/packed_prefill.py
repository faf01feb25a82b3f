"""Packed against padded, side by side in one run: a prefill of a skewed-length batch (a few long
prompts among many short ones) through a random Llama-shaped model with grouped-query heads.

    python benchmarks/packed_prefill.py                  # ~3 minutes on a shared 2-core VM
    python benchmarks/packed_prefill.py --dtype bfloat16 --rounds 5

It prints, best of the rounds (each round times every path in turn, so a shared machine's
drift hits them alike):

1. the whole prefill: exegpt packed (no token of padding), exegpt with every prompt padded to
   the longest (the work a padded batch does), and transformers' forward over the padded batch
   with its attention mask; seconds, sequences/s and the ratios. Then the same two exegpt
   paths on the embedded T5 (its encoder runs packed);
2. the attention kernel alone over the same rows: one call per row (what exegpt runs), one call
   over a block-diagonal causal mask of all tokens, and one padded batched call with a mask;
3. decode attention over a paged KV cache with skewed KV lengths: decode rows bucketed by
   length with padding bounds 0 (one bucket per length, the 128-key allowance off), 0.25 and
   the allowance (exegpt's) and 1 (one padded batch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from exegpt.dtypes import torch_dtype
from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, SequenceKV
from exegpt.models.loader import LoadedModel, load_model
from exegpt.models.packed import packed_attention, packed_layout
from exegpt.models.runner import ModelRunner

SHAPE = dict(
    vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
)  # fmt: skip


def skewed_lengths(num: int, long: int, seed: int = 0) -> list[int]:
    """Two long prompts and the rest short (16-96 tokens), seeded."""
    generator = torch.Generator().manual_seed(seed)
    short = torch.randint(16, 97, (num - 2,), generator=generator).tolist()
    return [long, *short[: num // 2], long, *short[num // 2 :]]


def best_of(rounds: int, paths: dict[str, Callable[[], object]]) -> dict[str, float]:
    for run in paths.values():  # warm-up: oneDNN builds its kernels on first use
        run()
    best = {name: float("inf") for name in paths}
    for _ in range(rounds):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def exegpt_prefill(loaded: LoadedModel, rows: list[list[int]]) -> Callable[[], object]:
    """A prefill of `rows` on the engine's runner, blocks released after."""
    width = max(len(row) for row in rows)
    num_blocks = 2 * len(rows) * width // 16 + 16  # self (and T5 cross) blocks, padded rows
    pool = KVCachePool(KVCacheSpec.for_model(loaded.config, loaded.dtype), num_blocks, 16)
    runner = ModelRunner(loaded.model, pool)

    def run() -> object:
        seqs = [SequenceKV() for _ in rows]
        logits = runner.prefill(seqs, rows)
        for seq in seqs:
            runner.release(seq)
        return logits

    return run


def padded_rows(prompts: list[list[int]]) -> list[list[int]]:
    """Every prompt padded with real tokens to the longest: the work of a padded batch."""
    width = max(len(p) for p in prompts)
    return [p + [3] * (width - len(p)) for p in prompts]


def prefill_paths(directory: str, dtype: torch.dtype, prompts: list[list[int]]) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    loaded = load_model(directory, dtype=dtype)
    width = max(len(p) for p in prompts)
    ids = torch.tensor(padded_rows(prompts))
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])

    @torch.inference_mode()
    def transformers() -> object:
        return hf(input_ids=ids, attention_mask=mask, use_cache=True).logits[:, -1]

    return {
        "exegpt packed": exegpt_prefill(loaded, prompts),
        "exegpt padded rows": exegpt_prefill(loaded, padded_rows(prompts)),
        "transformers padded": transformers,
    }


def t5_paths(dtype: torch.dtype, prompts: list[list[int]]) -> dict:
    """The embedded T5 (exegpt-tiny-t5): its encoder runs packed, its decoder padded."""
    loaded = load_model("exegpt-tiny-t5", dtype=dtype)
    vocab = loaded.config.vocab_size
    prompts = [[3 + t % (vocab - 3) for t in prompt] for prompt in prompts]
    return {
        "exegpt packed": exegpt_prefill(loaded, prompts),
        "exegpt padded rows": exegpt_prefill(loaded, padded_rows(prompts)),
    }


def kernel_paths(lengths: list[int], dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    heads, kv_heads, dim = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], 64
    total, width = sum(lengths), max(lengths)
    q = torch.randn(1, heads, total, dim, dtype=dtype)
    k = torch.randn(1, kv_heads, total, dim, dtype=dtype)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    block_diagonal = (row_of[:, None] == row_of[None]) & torch.ones(total, total).tril().bool()
    qp = torch.randn(len(lengths), heads, width, dim, dtype=dtype)
    kp = torch.randn(len(lengths), kv_heads, width, dim, dtype=dtype)
    keys = torch.arange(width)
    padded_mask = (keys[None, None] <= keys[None, :, None]) & (
        keys[None, None] < torch.tensor(lengths)[:, None, None]
    )

    def per_row() -> object:
        for start, n in zip(starts, lengths, strict=True):
            part = slice(start, start + n)
            F.scaled_dot_product_attention(
                q[:, :, part], k[:, :, part], k[:, :, part], is_causal=True, enable_gqa=True
            )

    def one_call() -> object:
        return F.scaled_dot_product_attention(q, k, k, attn_mask=block_diagonal, enable_gqa=True)

    def padded() -> object:
        return F.scaled_dot_product_attention(
            qp, kp, kp, attn_mask=padded_mask[:, None], enable_gqa=True
        )

    return {
        "one call per row (exegpt)": per_row,
        "block-diagonal mask": one_call,
        "padded batch + mask": padded,
    }


def decode_paths(kv_lengths: list[int], dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    heads, kv_heads, dim = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], 64
    num_slots = sum(kv_lengths) + 1
    cache_k = torch.randn(num_slots, kv_heads, dim, dtype=dtype)
    cache_v = torch.randn(num_slots, kv_heads, dim, dtype=dtype)
    rows = len(kv_lengths)
    q = torch.randn(1, rows, heads, dim, dtype=dtype)
    new = torch.randn(1, rows, kv_heads, dim, dtype=dtype)
    query_starts = torch.arange(rows + 1)
    positions = torch.tensor([n - 1 for n in kv_lengths])
    read_slots = torch.randperm(num_slots - 1)  # scattered blocks, as in a real pool
    paths = {}
    paths_by_bound = (
        (0.0, 0, "per length"),
        (0.25, None, "0.25 (exegpt)"),
        (1.0, None, "one batch"),
    )
    for padding, min_padding, label in paths_by_bound:
        layout = packed_layout(
            query_starts, positions, read_slots, None, padding, min_padding=min_padding
        )

        def run(layout=layout) -> object:
            return packed_attention(q, new, new, cache_k, cache_v, layout, dim**-0.5)

        paths[f"buckets, padding {label} [{len(layout.buckets)}]"] = run
    return paths


def print_block(title: str, best: dict[str, float], per_s: float | None = None) -> None:
    print(title)
    base = next(iter(best.values()))
    for name, seconds in best.items():
        rate = f"{per_s / seconds:>9.2f} seq/s" if per_s else ""
        print(f"  {name:<34}{seconds * 1000:>10.2f} ms{rate}   {seconds / base:>5.2f}x time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--long", type=int, default=512, help="tokens of the two long prompts")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dtype = torch_dtype(args.dtype)
    lengths = skewed_lengths(args.num_prompts, args.long)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, SHAPE["vocab_size"], (n,), generator=generator).tolist()
               for n in lengths]  # fmt: skip
    print(
        f"{len(lengths)} prompts, {sum(lengths)} tokens ({len(lengths) * max(lengths)} padded), "
        f"{args.dtype}, {torch.get_num_threads()} threads, best of {args.rounds}"
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPE)).save_pretrained(
            directory
        )
        whole = best_of(args.rounds, prefill_paths(directory, dtype, prompts))
    print_block("prefill, whole model:", whole, per_s=len(lengths))
    print(f"  packed speed-up: {whole['exegpt padded rows'] / whole['exegpt packed']:.2f}x "
          f"over padded rows, {whole['transformers padded'] / whole['exegpt packed']:.2f}x "
          "over transformers padded")  # fmt: skip
    with torch.inference_mode():
        t5 = best_of(args.rounds, t5_paths(dtype, prompts))
    print_block("prefill, the embedded T5 (encoder packed, decoder padded):", t5, len(lengths))
    print(f"  packed speed-up: {t5['exegpt padded rows'] / t5['exegpt packed']:.2f}x")
    with torch.inference_mode():
        kernels = best_of(args.rounds, kernel_paths(lengths, dtype))
        kv_lengths = [1024, 1024, *[64 + 6 * i for i in range(30)]]
        decodes = best_of(args.rounds * 5, decode_paths(kv_lengths, dtype))
    print_block("prefill attention kernel alone (same rows):", kernels)
    print_block(f"decode attention, {len(kv_lengths)} rows, KV 64..1024:", decodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
