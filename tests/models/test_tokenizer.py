"""Tokenizers: the byte tokenizer, its tokenizer.json twin, and the HF wrapper."""

from __future__ import annotations

import pytest

from exegpt.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TEXTS = ["hello world", "  héllo\n\twörld ✓ 😀", "", "ends with space "]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < 259 for i in ids)
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_ids_and_specials() -> None:
    tokenizer = ByteTokenizer()
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == 259 and tokenizer.eos_token_id == 1
    assert tokenizer.encode("A") == [3 + 65]
    # pad, eos, unk and ids past the byte range are skipped
    assert tokenizer.decode([0, 3 + 104, 1, 3 + 105, 2, 300]) == "hi"
    assert tokenizer.decode([3 + 0xE2, 3 + 0x9C]) == "\ufffd"  # a truncated character


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_json_twin_agrees(text: str) -> None:
    tokenizer = ByteTokenizer()
    twin = HFTokenizer(tokenizer.to_hf(), eos_token_id=1)
    assert twin.encode(text) == tokenizer.encode(text)
    ids = [0, *tokenizer.encode(text), 1, 300, 3 + 0xFF]
    assert twin.decode(ids) == tokenizer.decode(ids)
    assert twin.vocab_size == 259


def test_hf_tokenizer_wraps_tokenizer_json(tmp_path: object) -> None:
    import tokenizers

    raw = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "hi": 2, "there": 3}, "<pad>")
    )
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    raw.decoder = tokenizers.decoders.WordPiece()
    raw.add_special_tokens([tokenizers.AddedToken("</s>", special=True)])
    path = f"{tmp_path}/tokenizer.json"
    raw.save(path)
    tokenizer = HFTokenizer.from_file(path, eos_token_id=1)
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.encode("hi there") == [2, 3]
    assert tokenizer.decode([2, 3, 1]) == "hi there"
    assert tokenizer.eos_token_id == 1 and tokenizer.vocab_size == 4
