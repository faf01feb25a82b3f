"""The OpenAI-compatible HTTP gateway over a real router and worker: answers and bad input."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import Stack

MODEL = "exegpt-tiny-t5"


@pytest.fixture()
def http(stack: Stack) -> httpx.Client:
    with httpx.Client(base_url=stack.http_url, timeout=60) as client:
        yield client


def _complete(http: httpx.Client, **body: object) -> httpx.Response:
    return http.post("/v1/completions", json={"model": MODEL, **body})


def test_completion_with_text_prompt_reports_usage(http: httpx.Client) -> None:
    response = _complete(http, prompt="Hello", max_tokens=5, ignore_eos=True, temperature=0)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "token_ids" not in choice
    # "Hello" is 5 bytes in the byte-level tokenizer.
    assert body["usage"].pop("exegpt_queue_s") > 0  # the engine's queue seconds
    assert body["usage"].pop("exegpt_generation_s") > 0  # admission to last token
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_token_id_prompt_returns_token_ids(http: httpx.Client) -> None:
    body = _complete(
        http, prompt=[10, 20, 30], max_tokens=4, ignore_eos=True, return_token_ids=True
    ).json()
    assert len(body["choices"][0]["token_ids"]) == 4
    assert body["usage"]["prompt_tokens"] == 3


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(http: httpx.Client) -> None:
    greedy = [
        _complete(http, prompt=[5, 6, 7], max_tokens=6, temperature=0, return_token_ids=True)
        for _ in range(2)
    ]
    assert (
        greedy[0].json()["choices"][0]["token_ids"] == greedy[1].json()["choices"][0]["token_ids"]
    )
    sampled = [
        _complete(
            http, prompt=[5, 6, 7], max_tokens=8, temperature=1.0, top_p=0.9, seed=11,
            ignore_eos=True, return_token_ids=True,
        ).json()["choices"][0]["token_ids"]
        for _ in range(2)
    ]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_streaming_sends_sse_chunks_then_usage_then_done(http: httpx.Client) -> None:
    body = {
        "model": MODEL, "prompt": [3, 4, 5], "max_tokens": 6, "ignore_eos": True,
        "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    token_ids = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    assert len(token_ids) == 6
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_models_and_health(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 1024
    assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "", "max_tokens": 4}, 400, "empty"),
        ({"prompt": [], "max_tokens": 4}, 400, "empty"),
        ({"prompt": "x" * 1100, "max_tokens": 4}, 400, "context"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 5000}, 400, "context"),
        ({"prompt": "hi", "max_tokens": 4, "model": "no-such-model"}, 404, "does not exist"),
        ({"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
        ({"prompt": 12, "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 4, "stream": "yes"}, 400, "stream"),
        ({"prompt": [1, 99999], "max_tokens": 4}, 400, "vocabulary"),
        ({"prompt": [1, -2], "max_tokens": 4}, 400, "vocabulary"),
        ({"prompt": "hi", "max_tokens": 4, "temperature": -0.5}, 400, "temperature"),
        ({"prompt": "hi", "max_tokens": 4, "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "max_tokens": 4, "n": 17}, 400, "less than or equal to 16"),
        ({"max_tokens": 4}, 400, "prompt"),
    ],
)
def test_bad_requests_get_clear_errors(
    http: httpx.Client, body: dict, status: int, fragment: str
) -> None:
    response = http.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    # The service keeps serving after every bad request.
    assert _complete(http, prompt="ok", max_tokens=1).status_code == 200


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b'{"prompt": "hi", "max_tokens": ', 400, "malformed JSON"),
        (b"[1, 2, 3]", 400, "JSON object"),
        (b'{"prompt": "\xff\xfe", "max_tokens": 4}', 400, "UTF-8"),
        (b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}', 413, ""),
    ],
)
def test_malformed_bodies_get_clear_errors(
    http: httpx.Client, content: bytes, status: int, fragment: str
) -> None:
    response = http.post(
        "/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]
    assert _complete(http, prompt="ok", max_tokens=1).status_code == 200


def test_client_disconnect_mid_stream_frees_the_request(stack: Stack, http: httpx.Client) -> None:
    engine = stack.workers[0].engine
    aborted_before = engine.stats().num_aborted
    body = {"model": MODEL, "prompt": [3, 4], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: ")
        assert engine.stats().num_running == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.kv_used_bytes == 0:
            break
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_used_bytes == 0
    assert stats.num_aborted == aborted_before + 1
    assert _complete(http, prompt="still serving", max_tokens=2).status_code == 200
