"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling.

Sampling is stateless: the draw for a sequence's n-th token uses a generator seeded from the
request's seed and n, so the same request gives the same tokens whichever process samples it
(the engine's own, or the last pipeline stage) and however it was batched. Each row fails
alone: a row whose logits are not finite gets an error, the others their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this temperature sampling is greedy: dividing logits by a tinier one overflows them
# to inf and the softmax to NaN (a request of temperature 1e-40 used to fail its whole batch).
MIN_TEMPERATURE = 1e-3
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive indices apart


@dataclass(frozen=True)
class RowSampling:
    """How to pick one sequence's next token."""

    temperature: float
    top_p: float
    seed: int
    index: int  # tokens the sequence has generated before this one

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclass(frozen=True)
class SampledTokens:
    token_ids: list[int]  # -1 where the row failed
    errors: list[str | None]


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> SampledTokens:
    """One token per row of logits [B, vocab]; greedy rows take the argmax in one call."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} sequences")
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    token_ids = logits.argmax(dim=-1).tolist()
    errors: list[str | None] = [None] * len(rows)
    for row, params in enumerate(rows):
        if not finite[row]:
            token_ids[row] = -1
            errors[row] = "the model produced non-finite logits for this request"
        elif not params.greedy:
            token_ids[row] = _sample_row(logits[row], params)
    return SampledTokens(token_ids, errors)


def _sample_row(logits: torch.Tensor, params: RowSampling) -> int:  # logits [vocab]
    generator = torch.Generator().manual_seed((params.seed * _SEED_MIX + params.index) % 2**63)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- rows as tensors (the last pipeline stage samples) -------------------------------------


def sampling_tensors(rows: list[RowSampling]) -> dict[str, torch.Tensor]:
    return {
        "sampling.temperature": torch.tensor([r.temperature for r in rows], dtype=torch.float64),
        "sampling.top_p": torch.tensor([r.top_p for r in rows], dtype=torch.float64),
        "sampling.seed": torch.tensor([r.seed for r in rows], dtype=torch.int64),
        "sampling.index": torch.tensor([r.index for r in rows], dtype=torch.int64),
    }


def rows_from_tensors(named: dict[str, torch.Tensor]) -> list[RowSampling]:
    try:
        columns = [
            named[f"sampling.{name}"].tolist() for name in ("temperature", "top_p", "seed", "index")
        ]
    except KeyError as exc:
        raise ValueError(f"sampling parameters lack {exc}") from None
    if len({len(column) for column in columns}) != 1:
        raise ValueError("sampling parameters have rows of different lengths")
    return [RowSampling(*row) for row in zip(*columns, strict=True)]
