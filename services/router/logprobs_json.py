"""Token logprobs in OpenAI's JSON shapes: the completions object (parallel lists) and the
chat object (`content`: one entry per token, with its UTF-8 bytes).

The values are what the sampler reports: log-softmax of the distribution the token was drawn
from, after penalties and temperature (greedy: temperature 1), before top-p.
"""

from __future__ import annotations

from typing import Any

from exegpt.generation import TokenLogprob


def completion_logprobs(logprobs: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """`/v1/completions`' logprobs: `text_offset` is where the first token's text starts."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [_by_text(lp) for lp in logprobs],
        "text_offset": offsets,
    }


def _by_text(logprob: TokenLogprob) -> dict[str, float]:
    """The alternatives keyed by text; tokens with the same text keep the likeliest."""
    top: dict[str, float] = {}
    for alternative in logprob.top:  # most likely first
        top.setdefault(alternative.token, alternative.logprob)
    return top


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """`/v1/chat/completions`' logprobs."""
    return {
        "content": [
            {
                **_entry(lp.token, lp.logprob),
                "top_logprobs": [_entry(t.token, t.logprob) for t in lp.top],
            }
            for lp in logprobs
        ]
    }


def _entry(token: str, logprob: float) -> dict[str, Any]:
    data = token.encode("utf-8", errors="replace")
    return {"token": token, "logprob": logprob, "bytes": list(data)}
