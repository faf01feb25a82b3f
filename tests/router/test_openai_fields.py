"""logprobs, n, presence/frequency penalties and stop token ids through the official openai
client against a real deployment (router + worker), checked against exegpt's own model."""

from __future__ import annotations

import collections
import math

import openai
import pytest
import torch

from exegpt.models.kv_cache import SequenceKV
from exegpt.models.loader import load_model
from tests.conftest import Stack
from tests.models.helpers import make_runner

MODEL = "exegpt-tiny-t5"
PROMPT = [7, 8, 9, 10, 11]
GREEDY = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 12}
IDS = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


def _ids(choice: object) -> list[int]:
    return list(choice.model_extra["token_ids"])  # type: ignore[attr-defined]


def _reference_logprobs(prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """Per generated position: the model's log-softmax, from exegpt's own forward (a fresh
    prefill of the prompt and the tokens before it)."""
    runner = make_runner(load_model(MODEL), num_blocks=64, block_size=4)
    rows = []
    with torch.inference_mode():
        for j in range(len(generated)):
            seq = SequenceKV()
            logits = runner.prefill([seq], [prompt], [generated[:j]])[0]
            rows.append(torch.log_softmax(logits.float(), dim=-1))
            runner.release(seq)
    return rows


def test_greedy_logprobs_equal_the_models_own_distribution(client: openai.OpenAI) -> None:
    completion = client.completions.create(**GREEDY, logprobs=3, extra_body=IDS)
    choice = completion.choices[0]
    ids = _ids(choice)
    logprobs = choice.logprobs
    assert logprobs is not None and len(ids) == 12
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(ids)
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    for reference, token, logprob, top in zip(
        _reference_logprobs(PROMPT, ids), ids, logprobs.token_logprobs, logprobs.top_logprobs,
        strict=True,
    ):  # fmt: skip
        assert logprob == pytest.approx(float(reference[token]), abs=1e-4)
        assert logprob == pytest.approx(float(reference.max()), abs=1e-4)  # greedy: the max
        assert 1 <= len(top) <= 3  # keyed by token text: byte tokens may share one
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)


def test_chat_logprobs_plain_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    fields = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 6}
    plain = client.chat.completions.create(
        **fields, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}
    )
    content = plain.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
    stream = client.chat.completions.create(
        **fields, logprobs=True, top_logprobs=2, stream=True, extra_body={"ignore_eos": True}
    )
    streamed = [
        entry.logprob
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    assert streamed == [entry.logprob for entry in content]
    assert math.exp(content[0].logprob) <= 1.0


def test_n_choices_seeded_reproducible_greedy_identical(client: openai.OpenAI) -> None:
    sampled = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}
    first = client.completions.create(**sampled, n=3, seed=7, extra_body=IDS)
    again = client.completions.create(**sampled, n=3, seed=7, best_of=3, extra_body=IDS)
    assert [c.index for c in first.choices] == [0, 1, 2]
    runs = [[_ids(c) for c in r.choices] for r in (first, again)]
    assert runs[0] == runs[1]
    assert len({tuple(ids) for ids in runs[0]}) > 1  # distinct seeds per choice
    single = client.completions.create(**sampled, seed=7, extra_body=IDS)
    assert _ids(single.choices[0]) == runs[0][0]  # choice 0 keeps the request's seed
    assert first.usage is not None and first.usage.completion_tokens == 24
    assert first.usage.prompt_tokens == len(PROMPT)
    greedy = client.completions.create(**GREEDY, n=3, extra_body=IDS)
    assert len({tuple(_ids(c)) for c in greedy.choices}) == 1


def test_n_choices_stream_interleaved_by_index(client: openai.OpenAI) -> None:
    sampled = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 3}
    whole = client.completions.create(**sampled, n=3, extra_body=IDS)
    texts: dict[int, str] = collections.defaultdict(str)
    finishes = {}
    stream = client.completions.create(
        **sampled, n=3, stream=True, stream_options={"include_usage": True}, extra_body=IDS
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert dict(texts) == {c.index: c.text for c in whole.choices}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage is not None and usage.completion_tokens == 24
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3,
        temperature=0,
    )  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_frequency_penalty_reduces_the_greedy_outputs_repeats(client: openai.OpenAI) -> None:
    fields = {**GREEDY, "max_tokens": 24}
    plain = _ids(client.completions.create(**fields, extra_body=IDS).choices[0])
    token, count = collections.Counter(plain).most_common(1)[0]
    assert count >= 3, plain  # the random tiny model repeats itself
    penalised = client.completions.create(**fields, frequency_penalty=2.0, extra_body=IDS)
    assert penalised.choices[0].model_extra["token_ids"].count(token) < count
    assert max(collections.Counter(_ids(penalised.choices[0])).values()) < count
    # A negative presence penalty favours what was said: no more distinct tokens than before.
    rewarded = client.completions.create(**fields, presence_penalty=-2.0, extra_body=IDS)
    assert len(set(_ids(rewarded.choices[0]))) <= len(set(plain))


def test_stop_token_ids_end_generation_at_the_first_listed_token(client: openai.OpenAI) -> None:
    plain = _ids(client.completions.create(**GREEDY, extra_body=IDS).choices[0])
    stop = plain[3]
    end = plain.index(stop) + 1
    for extra in ({"stop": [stop]}, {"stop_token_ids": [stop]}):
        body = {**GREEDY, "extra_body": {**IDS, **extra}}
        completion = client.completions.create(**body)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert _ids(choice) == plain[:end]
        assert completion.usage is not None and completion.usage.completion_tokens == end


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"best_of": 3, "n": 2}, "best_of"),
        ({"n": 17}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_out_of_range_fields_are_refused(client: openai.OpenAI, fields: dict, named: str) -> None:
    with pytest.raises(openai.BadRequestError, match=named):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, **fields)


def test_top_logprobs_needs_logprobs(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
