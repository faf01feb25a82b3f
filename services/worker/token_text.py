"""What the worker adds to a chunk's tokens for the client: each logprob's token text, and
which tokens reach the text (a stop token id ends the output but is not part of its text)."""

from __future__ import annotations

from dataclasses import replace

from exegpt.generation import FinishReason, GenerationChunk, SamplingParams, TokenLogprob
from exegpt.models.tokenizer import Tokenizer


def named_logprobs(tokenizer: Tokenizer | None, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
    """`logprobs` with each token's (and alternative's) text: its ids decoded alone."""
    if tokenizer is None or not logprobs:
        return logprobs
    names: dict[int, str] = {}

    def name(token_id: int) -> str:
        if token_id not in names:
            names[token_id] = tokenizer.decode([token_id])
        return names[token_id]

    return [
        replace(
            lp,
            token=name(lp.token_id),
            top=tuple(replace(t, token=name(t.token_id)) for t in lp.top),
        )
        for lp in logprobs
    ]


def text_token_ids(chunk: GenerationChunk, sampling: SamplingParams) -> list[int]:
    """The chunk's tokens that become text: all but a final stop token id."""
    ids = chunk.token_ids
    if chunk.finish_reason is FinishReason.STOP and ids and ids[-1] in sampling.stop_token_ids:
        return ids[:-1]
    return ids
