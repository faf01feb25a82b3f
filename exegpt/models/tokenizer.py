"""Tokenizers: a small protocol, a wrapper for `tokenizers`, and the default model's byte one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json); encode applies its post-processor only."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token_id: int) -> None:
        self._tokenizer = tokenizer
        self._eos_token_id = eos_token_id

    @classmethod
    def from_file(cls, path: str | Path, eos_token_id: int) -> HFTokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)), eos_token_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class ByteTokenizer:
    """UTF-8 bytes: 0 = pad, 1 = eos, 2 = unk, 3..258 = bytes 0..255."""

    PAD_ID = 0
    EOS_ID = 1
    UNK_ID = 2
    BYTE_OFFSET = 3

    @property
    def vocab_size(self) -> int:
        return self.BYTE_OFFSET + 256

    @property
    def eos_token_id(self) -> int:
        return self.EOS_ID

    def encode(self, text: str) -> list[int]:
        return [self.BYTE_OFFSET + b for b in text.encode("utf-8")]

    def to_hf(self) -> tokenizers.Tokenizer:
        """The same mapping as a `tokenizers` byte-level tokenizer (for tokenizer.json).

        One difference: like every HF tokenizer, it reads the literal text "</s>" as EOS.
        """
        byte_chars = _byte_level_chars()
        vocab = {"<pad>": self.PAD_ID, "</s>": self.EOS_ID, "<unk>": self.UNK_ID}
        vocab.update({byte_chars[b]: self.BYTE_OFFSET + b for b in range(256)})
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>"))
        # No regex split and no merges: every byte becomes exactly one token.
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=False
        )
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        tokenizer.add_special_tokens(
            [tokenizers.AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")]
        )
        return tokenizer

    def decode(self, ids: list[int]) -> str:
        # Special ids, and ids past the byte range (the default model's vocab is larger), are
        # skipped rather than rendered.
        data = bytes(i - self.BYTE_OFFSET for i in ids if self.BYTE_OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return chars
