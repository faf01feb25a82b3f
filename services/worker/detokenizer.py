"""Incremental detokenization for streaming: emit only complete characters."""

from __future__ import annotations

from exegpt.models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding the whole output each time is simple and exact for byte-level and BPE
    tokenizers alike; a trailing U+FFFD means a character is still incomplete, so it is
    held back until the next tokens arrive (or the stream ends).
    """

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._emitted = ""

    def add(self, token_ids: list[int], final: bool = False) -> str:
        if self._tokenizer is None:
            return ""
        self._token_ids.extend(token_ids)
        text = self._tokenizer.decode(self._token_ids)
        if not final and text.endswith(_REPLACEMENT):
            text = text.rstrip(_REPLACEMENT)
        if not text.startswith(self._emitted):
            # A tokenizer may re-segment earlier text; never take back what was sent.
            return ""
        delta, self._emitted = text[len(self._emitted) :], text
        return delta

    @property
    def text(self) -> str:
        return self._emitted
