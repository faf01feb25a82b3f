"""`exegpt up --model org/name` over two stage processes, the checkpoint found in a local
Hugging Face cache layout (HF_HUB_CACHE): the stages get the snapshot under their
--model-root, and the tokens equal transformers'."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from exegpt.sdk import Client
from tests.models.conftest import build_family_hf
from tests.models.test_hub_cache import _cache_layout

PROMPT = [5, 6, 7, 8, 9, 10, 11]


def test_up_serves_a_hub_id_from_the_local_cache_over_two_stages(tmp_path: Path) -> None:
    hf_model = build_family_hf("qwen2", num_layers=2)
    checkpoint = tmp_path / "plain"
    hf_model.save_pretrained(checkpoint, safe_serialization=True)
    _cache_layout(tmp_path / "hub", "acme/tiny-qwen2", checkpoint)
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False)
    command = [
        sys.executable, "-m", "exegpt.commands.cli", "up", "--model", "acme/tiny-qwen2",
        "--pipeline-stages", "2", "--http-port", "0", "--grpc-port", "0",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = launcher.stdout.readline()
        assert "ready" in line, line
        grpc_address = re.search(r"grpc=(\S+)", line).group(1)
        with Client(grpc_address) as client:
            assert client.list_models() == ["acme/tiny-qwen2"]
            completion = client.generate(PROMPT, max_tokens=5, ignore_eos=True)
        assert completion.token_ids == expected[0, len(PROMPT) :].tolist()
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
