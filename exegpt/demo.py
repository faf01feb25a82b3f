"""`exegpt demo`: the README's main job. Starts a local deployment of the embedded default
model (router + worker replicas as separate processes), sends a few requests through the
gRPC SDK and the OpenAI-compatible HTTP gateway, prints the answers and where each service
listens, and shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import urllib.request
from pathlib import Path

from exegpt.launcher import Deployment, DeploymentConfig
from exegpt.sdk import Client

DESCRIPTION = "start a local deployment, send a few requests, print answers"
logger = logging.getLogger("exegpt.demo")

PROMPTS = ("Translate to German: The house is small.", "def fibonacci(n):", "Hello, exegpt!")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DeploymentConfig.model, help="model name or HF directory"
    )
    parser.add_argument("--replicas", type=int, default=2, help="worker processes")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per demo answer")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _http_completion(base_url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _http_stream(base_url: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=json.dumps({**payload, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    return events


def run(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="exegpt-demo-logs-"))
    config = DeploymentConfig(
        model=args.model, num_replicas=args.replicas, http_port=0, grpc_port=0, log_dir=log_dir
    )
    _out(f"Starting router + {args.replicas} worker replica(s) of {args.model} ...")
    with Deployment(config) as deployment:
        _out("ready:")
        _out(f"  OpenAI-compatible HTTP gateway  {deployment.http_url}/v1/completions")
        _out(f"  router gRPC (SDK)               {deployment.grpc_address}")
        for index, address in enumerate(deployment.worker_addresses):
            _out(f"  {f'worker replica {index} gRPC':<32}{address}")
        _out(f"  service logs                    {log_dir}")
        _out()
        _out("(The embedded default model has seeded random weights: its text is noise.)")
        _run_requests(deployment, args.max_tokens)
    _out("All services stopped.")
    return 0


def _run_requests(deployment: Deployment, max_tokens: int) -> None:
    with Client(deployment.grpc_address) as client:
        for prompt in PROMPTS:
            completion = client.generate(prompt, max_tokens=max_tokens)
            _out(f"[gRPC SDK] {prompt!r}")
            _out(
                f"  -> {completion.text!r}\n     {completion.completion_tokens} tokens, "
                f"finish={completion.finish_reason}, ttft={completion.ttft_s * 1000:.1f} ms, "
                f"total={completion.latency_s * 1000:.1f} ms"
            )
        chunks = list(client.stream("Stream me", max_tokens=8, temperature=0.8, seed=7))
        _out(f"[gRPC SDK stream] {len(chunks)} chunks: {[c.token_ids for c in chunks]}")
    body = _http_completion(
        deployment.http_url,
        {"prompt": "Hello from HTTP", "max_tokens": max_tokens, "temperature": 0},
    )
    _out(f"[HTTP] POST /v1/completions -> {body['choices'][0]['text']!r}  usage={body['usage']}")
    events = _http_stream(
        deployment.http_url,
        {"prompt": [3, 50, 60, 70], "max_tokens": 6, "ignore_eos": True, "return_token_ids": True},
    )
    token_ids = [t for event in events for choice in event["choices"] for t in choice["token_ids"]]
    _out(f"[HTTP stream] {len(events)} server-sent events, token ids {token_ids}")
