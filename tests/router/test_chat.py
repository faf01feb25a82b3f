"""/v1/chat/completions and the OpenAI fields of /v1/completions, through the official
openai client: chat (fallback and checkpoint templates), stop, echo, and refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jinja2
import openai
import pytest

from exegpt.chat import ChatTemplate, ChatTemplateError, read_chat_template, render_chat
from tests.conftest import BackgroundLoop, Stack

MODEL = "exegpt-tiny-t5"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
FALLBACK_PROMPT = "system: Be brief.\nuser: Hi\nassistant:"
LLAMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


def test_chat_with_the_fallback_template(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = answer.choices[0]
    assert answer.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    # the byte tokenizer: one prompt token per byte of the rendered fallback template
    assert answer.usage.prompt_tokens == len(FALLBACK_PROMPT.encode())


def test_chat_streams_the_same_text(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_stop_cuts_the_text_before_it(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    full = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].text  # fmt: skip
    stop = full[4:6]
    expected = full[: full.find(stop)]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "never seen"],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and 0 < cut.usage.completion_tokens < 16
    streamed = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "Echo me", "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    echoed = client.completions.create(**kwargs, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "Echo me" + plain.choices[0].text


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"logprobs": 2, "echo": True}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"n": 0}, "n"),
        ({"echo": True, "prompt": [5, 6]}, "echo"),
    ],
)
def test_unsupported_completion_fields_are_refused(
    client: openai.OpenAI, fields: dict, named: str
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError, match=named):
        client.completions.create(**body)


def test_unknown_and_unsupported_chat_fields_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)


def test_templates_read_from_the_checkpoint_and_sandboxed(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": ' + _json(LLAMA_LIKE) + ', "bos_token": {"content": "<s>"}}'
    )
    template = read_chat_template(tmp_path)
    assert template == ChatTemplate(LLAMA_LIKE, "<s>", "")
    rendered = render_chat(MESSAGES, template)
    assert rendered == "<s>[SYSTEM] Be brief.\n[USER] Hi\n[ASSISTANT]"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ChatTemplateError, match="no system role"):
        render_chat(MESSAGES, read_chat_template(tmp_path))
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        render_chat(MESSAGES, escape)
    assert issubclass(jinja2.exceptions.SecurityError, jinja2.TemplateError)


@pytest.fixture(scope="module")
def templated(
    background_loop: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A router over a worker whose checkpoint directory carries a chat template."""
    from exegpt.models.loader import load_model, save_default_model
    from services.router.config import RouterConfig
    from services.router.server import start_router
    from services.worker.config import WorkerConfig
    from services.worker.server import start_worker

    directory = save_default_model(tmp_path_factory.mktemp("templated"))
    (directory / "tokenizer_config.json").write_text(
        '{"chat_template": ' + _json(LLAMA_LIKE) + ', "bos_token": "<s>"}'
    )
    loaded = load_model(str(directory), name="templated")
    worker = background_loop.run(start_worker(WorkerConfig(port=0), loaded))
    config = RouterConfig(replicas=(worker.address,), grpc_port=0, http_port=0)
    router = background_loop.run(start_router(config))
    yield router.http_url
    background_loop.run(router.stop(0.5))
    background_loop.run(worker.stop(0.5))


def test_chat_uses_the_checkpoint_template(templated: str) -> None:
    client = openai.OpenAI(base_url=f"{templated}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="templated", messages=MESSAGES, max_tokens=3, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    prompt = "<s>[SYSTEM] Be brief.\n[USER] Hi\n[ASSISTANT]"
    assert answer.usage is not None
    # the checkpoint's byte-level tokenizer.json: one token per byte ("<s>" is plain text)
    assert answer.usage.prompt_tokens == len(prompt.encode())


def _json(text: str) -> str:
    import json

    return json.dumps(text)
