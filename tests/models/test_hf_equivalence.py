"""Our runner against Hugging Face transformers on tiny random checkpoints (float32)."""

from __future__ import annotations

import pytest
import torch

from exegpt.models.kv_cache import SequenceKV
from tests.models.conftest import VARIANTS, Checkpoint
from tests.models.helpers import PROMPTS, assert_logits_close, greedy, make_runner

NUM_NEW_TOKENS = 10


def hf_greedy_single(ckpt: Checkpoint, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = ckpt.hf_model.generate(ids, do_sample=False, max_new_tokens=NUM_NEW_TOKENS)
    skip = 1 if ckpt.variant.startswith("t5") else len(prompt)  # T5: the decoder start token
    return out[0, skip:].tolist()


def hf_greedy_batch(ckpt: Checkpoint, prompts: list[list[int]]) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    left_pad = not ckpt.variant.startswith("t5")  # decoder-only models generate from the right
    rows, masks = [], []
    for prompt in prompts:
        pad = [0] * (width - len(prompt))
        ones = [1] * len(prompt)
        rows.append(pad + prompt if left_pad else prompt + pad)
        masks.append([0] * len(pad) + ones if left_pad else ones + [0] * len(pad))
    out = ckpt.hf_model.generate(
        torch.tensor(rows),
        attention_mask=torch.tensor(masks),
        do_sample=False,
        max_new_tokens=NUM_NEW_TOKENS,
    )
    skip = width if left_pad else 1
    return out[:, skip:].tolist()


def hf_first_logits(ckpt: Checkpoint, prompt: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if ckpt.variant.startswith("t5"):
            start = torch.tensor([[ckpt.hf_model.config.decoder_start_token_id]])
            return ckpt.hf_model(input_ids=ids, decoder_input_ids=start).logits[0, -1]
        return ckpt.hf_model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_logits_match_hf(checkpoints: dict[str, Checkpoint], variant: str) -> None:
    ckpt = checkpoints[variant]
    runner = make_runner(ckpt.loaded)
    seqs = [SequenceKV() for _ in PROMPTS]
    ours = runner.prefill(seqs, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert_logits_close(ours[i], hf_first_logits(ckpt, prompt))


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_single_requests_match_hf(checkpoints: dict[str, Checkpoint], variant: str) -> None:
    ckpt = checkpoints[variant]
    runner = make_runner(ckpt.loaded)
    for prompt in PROMPTS:
        assert greedy(runner, [prompt], NUM_NEW_TOKENS)[0] == hf_greedy_single(ckpt, prompt)
    assert runner.pool.num_free_blocks == runner.pool.num_blocks


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_batch_matches_hf(checkpoints: dict[str, Checkpoint], variant: str) -> None:
    ckpt = checkpoints[variant]
    ours = greedy(make_runner(ckpt.loaded), PROMPTS, NUM_NEW_TOKENS)
    assert ours == hf_greedy_batch(ckpt, PROMPTS)
    assert ours == [hf_greedy_single(ckpt, prompt) for prompt in PROMPTS]
    # The outputs must depend on the prompt, or this test would prove little.
    assert len({tuple(out) for out in ours}) == len(PROMPTS)
