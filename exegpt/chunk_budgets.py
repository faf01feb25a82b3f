"""The chunk budgets of chunked prefill, checked once for every place that takes them (the
worker's engine config and `exegpt up`'s deployment): --max-tokens-per-step N, and the
long-output budget --long-output-tokens-per-step M with its output length
--long-output-min-tokens G (services/worker/chunked.py says what they do)."""

from __future__ import annotations

# G: a request of this many output tokens has G - 1 gaps between them, enough that one longer
# step among them moves its time per output token (their mean) little.
DEFAULT_LONG_OUTPUT_MIN_TOKENS = 16


def check_chunk_budgets(
    max_tokens_per_step: int | None,
    long_output_tokens_per_step: int | None,
    long_output_min_tokens: int | None,
) -> None:
    """Raise ValueError, naming the flags, unless N >= 1, M >= 1 and M > N with N given,
    and G >= 1 (None: not given; G's None is its default)."""
    n, m, g = max_tokens_per_step, long_output_tokens_per_step, long_output_min_tokens
    if n is not None and n < 1:
        raise ValueError(f"--max-tokens-per-step must be >= 1 (got {n})")
    if g is not None and g < 1:
        raise ValueError(f"--long-output-min-tokens must be >= 1 (got {g})")
    if m is None:
        return
    if m < 1:
        raise ValueError(f"--long-output-tokens-per-step must be >= 1 (got {m})")
    if n is None:
        raise ValueError("--long-output-tokens-per-step needs --max-tokens-per-step")
    if m <= n:
        raise ValueError(
            f"--long-output-tokens-per-step ({m}) must exceed --max-tokens-per-step ({n})"
        )
