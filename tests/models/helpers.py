"""Helpers for model tests: runners over small pools and a greedy loop."""

from __future__ import annotations

import torch

from exegpt.models.kv_cache import KVCachePool, KVCacheSpec, SequenceKV
from exegpt.models.loader import LoadedModel
from exegpt.models.runner import ModelRunner


def make_runner(loaded: LoadedModel, num_blocks: int = 64, block_size: int = 4) -> ModelRunner:
    """Small blocks so that even short sequences span several non-contiguous blocks."""
    spec = KVCacheSpec.for_model(loaded.config, dtype=loaded.dtype)
    pool = KVCachePool(spec, num_blocks, block_size, device=loaded.device)
    return ModelRunner(loaded.model, pool)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 agreement relative to the logits' scale (untied T5 heads give large logits).
    A batched step and a solo one run their GEMMs at other row counts, which CPU kernels block
    differently, so the float32 sums round differently: on this project's VM after its CPU
    gained faster kernels, T5's staggered batch differed from its solo runs by up to 4.3e-5
    of the scale (tests/models/test_runner.py), past the 4e-5 allowed until then. A wrong KV
    row or mask moves logits by a good part of the scale, far beyond 8e-5 of it."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=8e-5 * max(scale, 1.0), rtol=1e-4)


def greedy(runner: ModelRunner, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Greedy ids for a batch: one prefill, then decode steps; never stops at EOS."""
    seqs = [SequenceKV() for _ in prompts]
    outputs = [[token] for token in runner.prefill(seqs, prompts).argmax(-1).tolist()]
    for _ in range(num_tokens - 1):
        logits = runner.decode(seqs, [out[-1] for out in outputs])
        for out, token in zip(outputs, logits.argmax(-1).tolist(), strict=True):
            out.append(token)
    for seq in seqs:
        runner.release(seq)
    return outputs


PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [20, 21, 22],
    [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47],
    [100],
]


def decode_logits(
    loaded: LoadedModel, prompts: list[list[int]], poisoned: bool, steps: int = 3
) -> torch.Tensor:
    """The logits of `steps` greedy decode steps after prefilling `prompts` on a fresh runner;
    `poisoned`: every slot of its pool but the null one starts as NaN, what a freed block of a
    failed request may hold."""
    runner = make_runner(loaded)
    if poisoned:
        for layer in runner.pool.layers:
            layer.k[:-1].fill_(float("nan"))
            layer.v[:-1].fill_(float("nan"))
    seqs = [SequenceKV() for _ in prompts]
    last = runner.prefill(seqs, prompts).argmax(-1).tolist()
    for _ in range(steps):
        logits = runner.decode(seqs, last)
        last = logits.argmax(-1).tolist()
    return logits
