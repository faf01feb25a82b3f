"""The transformers baseline the speed benchmarks compare against: `generate` in static
batches, greedy, forced output lengths (EOS ignored), in a given dtype.

A static batch runs until its longest request is done, as a user's own `generate` loop would;
the caller counts only the tokens each request asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def transformers_runner(checkpoint: Path, dtype: torch.dtype, batch: int) -> Callable:
    """run(prompts, output_lengths) -> useful output tokens, for a T5 or Llama checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(checkpoint).is_encoder_decoder
    loader = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = loader.from_pretrained(checkpoint, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # forced lengths, as in the engine

    @torch.inference_mode()
    def run(prompts: list[list[int]], output_lengths: list[int]) -> int:
        for start in range(0, len(prompts), batch):
            rows = prompts[start : start + batch]
            new_tokens = max(output_lengths[start : start + batch])
            ids, mask = _padded(rows, left=not seq2seq)
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
            # T5 output starts with the decoder start token; a causal LM's with the prompt.
            expected = new_tokens + (1 if seq2seq else ids.shape[1])
            assert out.shape[1] == expected, (out.shape, expected)
        return sum(output_lengths)

    return run


def _padded(rows: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded with 0 (on the left for a decoder-only model)."""
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        pad = [0] * (width - len(row))
        ids.append(pad + row if left else row + pad)
        ones = [1] * len(row)
        mask.append([0] * len(pad) + ones if left else ones + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)
