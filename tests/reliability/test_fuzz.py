"""Property-based fuzzing of /v1/completions and Router.Generate/GenerateStream.

Whatever the body or message: a 4xx / non-internal gRPC status or a normal answer, never a
5xx (a 503 "no healthy replica" is the one allowed, and only with no replica), never a hang
(every call has a timeout), and the deployment still serves afterwards. The default run
takes 150 cases per interface; `--hypothesis-profile=soak` takes 1000.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exegpt.v1 import generate_pb2, router_pb2_grpc
from tests.reliability.procs import Services, router_addresses

TIMEOUT_S = 60.0
CASES_PER_INTERFACE = max(150, settings().max_examples)
ALLOWED_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
OUTCOMES: Counter[str] = Counter()


def share(num_tests: int) -> settings:
    return settings(
        max_examples=-(-CASES_PER_INTERFACE // num_tests),  # at least the total
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    group = Services(tmp_path_factory.mktemp("fuzz"))
    try:
        worker = group.worker("worker")
        yield router_addresses(group.router([worker.ready]))
    finally:
        group.close()
        print(f"\nfuzz outcomes: {dict(sorted(OUTCOMES.items()))}")


# ---- strategies ------------------------------------------------------------------------------

small_ints = st.integers(min_value=-3, max_value=12)
hostile_ints = st.sampled_from([0, -1, 2**31, 2**32 + 5, 2**63, -(2**63), 10**30])
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
any_value = st.one_of(json_values, small_ints, hostile_ints)
prompts = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(small_ints, st.integers(0, 40000), hostile_ints), max_size=40),
    st.lists(st.text(max_size=20), max_size=3),
    st.lists(st.lists(st.integers(-5, 300), max_size=10), max_size=2),
    any_value,
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.just("exegpt-tiny-t5"), any_value),
    "max_tokens": st.one_of(small_ints, hostile_ints, any_value),
    "temperature": st.one_of(st.floats(-2, 3), st.just(1e-40), any_value),
    "top_p": st.one_of(st.floats(-1, 2), any_value),
    "seed": st.one_of(st.integers(), any_value),
    "n": st.one_of(st.integers(0, 3), any_value),
    "stream": st.one_of(st.booleans(), any_value),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": any_value}), any_value),
    "ignore_eos": st.one_of(st.booleans(), any_value),
    "return_token_ids": st.one_of(st.booleans(), any_value),
}
# Bodies that mostly pass validation, so generation itself is exercised too.
plausible_bodies = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            st.text(min_size=1, max_size=80), st.lists(st.integers(0, 40), min_size=1, max_size=20)
        ),
        "max_tokens": st.integers(1, 8),
    },
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**63 - 1),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(),
        "return_token_ids": st.booleans(),
    },
)
completion_bodies = st.one_of(
    plausible_bodies,
    st.fixed_dictionaries({"prompt": prompts}, optional={**FIELDS, "extra": any_value}),
)


# ---- HTTP ------------------------------------------------------------------------------------


def post(http_url: str, content: bytes) -> None:
    response = httpx.post(
        f"{http_url}/v1/completions",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT_S,  # a hang fails the case
    )
    OUTCOMES[f"http {response.status_code}"] += 1
    assert response.status_code < 500, (content[:300], response.status_code, response.text[:300])
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", response.text[-300:]
        for event in events[:-1]:
            error = json.loads(event[6:]).get("error")
            assert error is None or error["type"] != "server_error", error
    else:
        assert isinstance(response.json(), dict)


def still_serves(http_url: str) -> None:
    body = {"prompt": "still there?", "max_tokens": 2, "ignore_eos": True}
    response = httpx.post(f"{http_url}/v1/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text


def test_http_completion_bodies(deployment: tuple[str, str]) -> None:
    _, http_url = deployment

    @share(2)
    @given(completion_bodies)
    def case(body: dict[str, Any]) -> None:
        post(http_url, json.dumps(body).encode())

    case()
    still_serves(http_url)


def test_http_raw_bodies(deployment: tuple[str, str]) -> None:
    _, http_url = deployment
    raw = st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )

    @share(2)
    @given(raw)
    def case(content: bytes) -> None:
        post(http_url, content)

    case()
    still_serves(http_url)


# ---- gRPC ------------------------------------------------------------------------------------

plausible_requests = st.builds(
    lambda prompt, max_tokens, temperature, top_p, model: generate_pb2.GenerateRequest(
        model=model,
        sampling=generate_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p
        ),
        **prompt,
    ),
    st.one_of(
        st.builds(lambda t: {"text": t}, st.text(min_size=1, max_size=80)),
        st.builds(
            lambda ids: {"token_ids": generate_pb2.TokenIds(ids=ids)},
            st.lists(st.integers(0, 40), min_size=1, max_size=20),
        ),
    ),
    st.integers(1, 8),
    st.floats(0, 2, width=32),
    st.floats(0.125, 1, width=32),
    st.sampled_from(["", "exegpt-tiny-t5"]),
)
uint32 = st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))
requests = st.builds(
    lambda rid, model, prompt, sampling: generate_pb2.GenerateRequest(
        request_id=rid, model=model, sampling=sampling, **prompt
    ),
    st.text(max_size=60),
    st.one_of(st.just(""), st.just("exegpt-tiny-t5"), st.text(max_size=30)),
    st.one_of(
        st.builds(lambda t: {"text": t}, st.text(max_size=200)),
        st.builds(
            lambda ids: {"token_ids": generate_pb2.TokenIds(ids=ids)},
            st.one_of(st.lists(st.integers(0, 40), max_size=40), st.lists(uint32, max_size=40)),
        ),
        st.just({}),
    ),
    st.builds(
        lambda max_tokens, temperature, top_p, seed, ignore_eos: generate_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
        ),  # fmt: skip
        st.one_of(st.integers(0, 12), uint32),
        st.one_of(st.floats(0, 2, width=32), st.floats(width=32)),
        st.one_of(st.floats(0.125, 1, width=32), st.floats(width=32)),
        st.one_of(st.none(), st.integers(0, 2**64 - 1)),
        st.booleans(),
    ),
)


def grpc_outcome(call: Callable[[], Any]) -> None:
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        details = exc.details() or ""
        OUTCOMES[f"grpc {code.name}"] += 1
        assert code in ALLOWED_GRPC, (code, details)
        return
    OUTCOMES[f"grpc {code.name}"] += 1


def still_serves_grpc(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        request = generate_pb2.GenerateRequest(
            text="hello", sampling=generate_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
        )
        result = router_pb2_grpc.RouterStub(channel).Generate(request, timeout=TIMEOUT_S)
        assert len(result.token_ids) == 2


def test_grpc_generate_requests(deployment: tuple[str, str]) -> None:
    address, _ = deployment
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        @share(3)
        @given(st.one_of(plausible_requests, requests), st.booleans())
        def case(request: generate_pb2.GenerateRequest, streaming: bool) -> None:
            if streaming:
                grpc_outcome(lambda: list(stub.GenerateStream(request, timeout=TIMEOUT_S)))
            else:
                grpc_outcome(lambda: stub.Generate(request, timeout=TIMEOUT_S))

        case()
    still_serves_grpc(address)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_grpc_raw_bytes(deployment: tuple[str, str], method: str) -> None:
    address, _ = deployment
    with grpc.insecure_channel(address) as channel:
        path = f"/exegpt.v1.Router/{method}"
        if method == "Generate":
            send = channel.unary_unary(path)
        else:
            stream = channel.unary_stream(path)

            def send(data: bytes, timeout: float) -> list[bytes]:
                return list(stream(data, timeout=timeout))

        @share(3)
        @given(st.binary(max_size=400))
        def case(data: bytes) -> None:
            grpc_outcome(lambda: send(data, timeout=TIMEOUT_S))

        case()
    still_serves_grpc(address)
