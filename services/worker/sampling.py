"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling with per-request seed."""

from __future__ import annotations

import torch

from exegpt.generation import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A private generator for a seeded sampled request, so its output is reproducible."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    return generator


def sample_next_tokens(
    logits: torch.Tensor,  # [B, vocab]
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row; greedy rows take the argmax in one batched call."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if row_params.temperature > 0:
            tokens[row] = _sample_row(logits[row], row_params, generator)
    return tokens


def _sample_row(
    logits: torch.Tensor,  # [vocab]
    params: SamplingParams,
    generator: torch.Generator | None,
) -> int:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
