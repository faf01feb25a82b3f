"""The official openai Python client talks to the gateway (completions and streaming)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Stack


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


def test_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="exegpt-tiny-t5", prompt="Hello there", max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == len(b"Hello there")


def test_streaming_completion(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="exegpt-tiny-t5", prompt=[7, 8, 9], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_models_list(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["exegpt-tiny-t5"]


def test_errors_surface_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="exegpt-tiny-t5", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)
