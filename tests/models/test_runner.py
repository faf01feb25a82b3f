"""ModelRunner: batching equals running alone, recompute after preemption, argument checks."""

from __future__ import annotations

import pytest
import torch

from exegpt.models.kv_cache import SequenceKV
from exegpt.models.loader import LoadedModel
from exegpt.models.runner import ModelRunner
from tests.models.conftest import Checkpoint
from tests.models.helpers import PROMPTS, assert_logits_close, greedy, make_runner

VARIANTS = ["t5", "t5-v1.1", "llama"]


def run_alone(runner: ModelRunner, prompt: list[int], num_tokens: int) -> list[torch.Tensor]:
    """Logits of each greedy step for one sequence on its own."""
    seq = SequenceKV()
    steps = [runner.prefill([seq], [prompt])[0]]
    for _ in range(num_tokens - 1):
        steps.append(runner.decode([seq], [int(steps[-1].argmax())])[0])
    runner.release(seq)
    return steps


@pytest.mark.parametrize("variant", VARIANTS)
def test_staggered_batch_equals_each_alone(
    checkpoints: dict[str, Checkpoint], variant: str
) -> None:
    """Sequences join and leave a running batch; every step's logits match a solo run."""
    runner = make_runner(checkpoints[variant].loaded)
    alone = [run_alone(runner, prompt, 8) for prompt in PROMPTS[:3]]
    seqs = [SequenceKV() for _ in range(3)]
    steps: list[list[torch.Tensor]] = [[], [], []]

    def record(indices: list[int], logits: torch.Tensor) -> None:
        for row, i in enumerate(indices):
            steps[i].append(logits[row])

    record([0, 1], runner.prefill(seqs[:2], PROMPTS[:2]))
    for _ in range(3):
        record([0, 1], runner.decode(seqs[:2], [int(steps[i][-1].argmax()) for i in (0, 1)]))
    record([2], runner.prefill(seqs[2:], PROMPTS[2:3]))  # joins with a longer prompt
    for _ in range(3):
        last = [int(steps[i][-1].argmax()) for i in range(3)]
        record([0, 1, 2], runner.decode(seqs, last))
    runner.release(seqs[0])  # leaves early; the others go on with different KV lengths
    record([1, 2], runner.decode(seqs[1:], [int(steps[i][-1].argmax()) for i in (1, 2)]))
    # Sequence 0 left after 7 steps, 2 joined 3 steps late; 1 ran all 8 of its solo run's.
    assert [len(recorded) for recorded in steps] == [7, 8, 5]
    for i, solo in enumerate(alone):
        for got, want in zip(steps[i], solo[: len(steps[i])], strict=True):
            assert_logits_close(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_with_prefix_equals_prefill_then_decode(
    checkpoints: dict[str, Checkpoint], variant: str
) -> None:
    """The recompute path: re-prefilling generated tokens restores the exact state."""
    runner = make_runner(checkpoints[variant].loaded)
    solo = run_alone(runner, PROMPTS[0], 8)
    generated = [int(logits.argmax()) for logits in solo]
    seqs = [SequenceKV(), SequenceKV()]
    # Batch a recomputed request (prefix of 4 tokens) with a fresh one (no prefix).
    logits = runner.prefill(seqs, [PROMPTS[0], PROMPTS[1]], [generated[:4], []])
    assert_logits_close(logits[0], solo[4])
    assert_logits_close(logits[1], run_alone(runner, PROMPTS[1], 1)[0])
    for step in range(5, 8):
        logits = runner.decode(seqs, [generated[step - 1], int(logits[1].argmax())])
        assert_logits_close(logits[0], solo[step])


def test_block_size_does_not_change_results(default_loaded: LoadedModel) -> None:
    small = greedy(make_runner(default_loaded, num_blocks=96, block_size=1), PROMPTS, 6)
    large = greedy(make_runner(default_loaded, num_blocks=16, block_size=32), PROMPTS, 6)
    assert small == large


def test_prefill_checks_arguments(default_loaded: LoadedModel) -> None:
    runner = make_runner(default_loaded)
    with pytest.raises(ValueError, match="empty prompt"):
        runner.prefill([SequenceKV()], [[]])
    with pytest.raises(ValueError, match="one prompt"):
        runner.prefill([SequenceKV()], [[5], [6]])
    with pytest.raises(ValueError, match="token ids"):
        runner.prefill([SequenceKV()], [[5, 384]])
    seq = SequenceKV()
    runner.prefill([seq], [[5, 6]])
    with pytest.raises(ValueError, match="fresh"):
        runner.prefill([seq], [[5, 6]])
    with pytest.raises(ValueError, match="not been prefilled"):
        runner.decode([SequenceKV()], [5])
    with pytest.raises(ValueError, match="one last token"):
        runner.decode([seq], [5, 6])
    runner.release(seq)
    assert runner.pool.used_bytes == 0


def test_runner_rejects_mismatched_pool(
    checkpoints: dict[str, Checkpoint], default_loaded: LoadedModel
) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ModelRunner(default_loaded.model, make_runner(checkpoints["llama"].loaded).pool)


def test_logits_are_float32_even_in_bfloat16() -> None:
    from exegpt.models.loader import load_model

    loaded = load_model("exegpt-tiny-t5", dtype=torch.bfloat16)
    runner = make_runner(loaded)
    assert runner.pool.layers[0].k.dtype == torch.bfloat16
    seq = SequenceKV()
    logits = runner.prefill([seq], [[5, 6, 7]])
    assert logits.dtype == torch.float32 and logits.shape == (1, 384)
    assert runner.decode([seq], [int(logits.argmax())]).isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(default_loaded: LoadedModel) -> None:
    from exegpt.models.loader import load_model

    on_gpu = load_model("exegpt-tiny-t5", device="cuda")
    assert greedy(make_runner(on_gpu), PROMPTS, 6) == greedy(
        make_runner(default_loaded), PROMPTS, 6
    )
    in_bf16 = make_runner(load_model("exegpt-tiny-t5", device="cuda", dtype=torch.bfloat16))
    seq = SequenceKV()
    assert in_bf16.prefill([seq], [PROMPTS[0]]).isfinite().all()
