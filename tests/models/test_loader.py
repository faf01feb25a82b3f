"""Loading: the embedded default model, HF checkpoint dirs (single and sharded), and errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exegpt.models.defaults import DEFAULT_MODEL_NAME, build_default_model
from exegpt.models.kv_cache import SequenceKV
from exegpt.models.loader import LoadedModel, ModelNotFoundError, load_model, save_default_model
from exegpt.models.tokenizer import ByteTokenizer, HFTokenizer
from tests.models.conftest import Checkpoint
from tests.models.helpers import PROMPTS, greedy, make_runner

_WEIGHTS_DIGEST = """
import hashlib
from exegpt.models.defaults import build_default_model
digest = hashlib.sha256()
for name, param in build_default_model().state_dict().items():
    digest.update(name.encode())
    digest.update(param.numpy().tobytes())
print(digest.hexdigest())
"""


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.numpy().tobytes())
    return digest.hexdigest()


def test_default_model(default_loaded: LoadedModel) -> None:
    assert default_loaded.name == DEFAULT_MODEL_NAME
    assert isinstance(default_loaded.tokenizer, ByteTokenizer)
    config = default_loaded.config
    assert (config.family, config.ffn, config.tie_word_embeddings) == ("t5", "relu", True)
    assert (config.d_model, config.num_heads, config.head_dim, config.d_ff) == (256, 4, 64, 1024)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.vocab_size) == (4, 4, 384)
    assert (config.eos_token_id, config.pad_token_id, config.decoder_start_token_id) == (1, 0, 0)
    assert config.max_context_tokens == 1024
    outputs = greedy(make_runner(default_loaded), PROMPTS, 8)
    assert len({tuple(out) for out in outputs}) == len(PROMPTS)  # depends on the prompt
    assert len({out[0] for out in outputs}) > 1
    assert len(set().union(*outputs)) >= 8  # not one token everywhere


def test_default_model_is_deterministic_and_fast() -> None:
    start_s = time.perf_counter()
    first = build_default_model()
    elapsed_s = time.perf_counter() - start_s
    assert elapsed_s < 1.0
    assert weights_digest(first) == weights_digest(build_default_model())
    other_process = subprocess.run(
        [sys.executable, "-c", _WEIGHTS_DIGEST],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert other_process.stdout.strip() == weights_digest(first)


def test_save_default_model_round_trips(tmp_path: Path, default_loaded: LoadedModel) -> None:
    path = save_default_model(tmp_path / "tiny")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded = load_model(str(path))
    assert loaded.name == "tiny"
    assert loaded.config == default_loaded.config
    assert weights_digest(loaded.model) == weights_digest(default_loaded.model)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.tokenizer.encode("héllo") == ByteTokenizer().encode("héllo")
    assert greedy(make_runner(loaded), PROMPTS, 5) == greedy(
        make_runner(default_loaded), PROMPTS, 5
    )


def test_transformers_reads_saved_default_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = save_default_model(tmp_path / "tiny")
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    ids = torch.tensor([PROMPTS[0]])
    start = torch.tensor([[0]])
    with torch.no_grad():
        want = hf_model(input_ids=ids, decoder_input_ids=start).logits[0, -1]
    loaded = load_model(str(path))
    got = make_runner(loaded).prefill([SequenceKV()], [PROMPTS[0]])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint(tmp_path: Path, checkpoints: dict[str, Checkpoint]) -> None:
    source = checkpoints["llama"]
    tensors = load_file(str(source.path / "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file))
        weight_map.update({n: file for n in shard_names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(source.path / "config.json", tmp_path / "config.json")
    loaded = load_model(str(tmp_path), name="llama-sharded")
    assert loaded.name == "llama-sharded" and loaded.tokenizer is None
    assert weights_digest(loaded.model) == weights_digest(source.loaded.model)


def test_unknown_name_or_missing_dir() -> None:
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL_NAME):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("/nonexistent/checkpoint/dir")


def test_dir_without_config_or_weights(tmp_path: Path, checkpoints: dict[str, Checkpoint]) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    shutil.copy(checkpoints["t5"].path / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_missing_shard_and_missing_tensor(
    tmp_path: Path, checkpoints: dict[str, Checkpoint]
) -> None:
    shutil.copy(checkpoints["t5"].path / "config.json", tmp_path / "config.json")
    index = {"weight_map": {"shared.weight": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="lacks shards"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").unlink()
    tensors = load_file(str(checkpoints["t5"].path / "model.safetensors"))
    del tensors["decoder.final_layer_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="decoder.final_layer_norm.weight"):
        load_model(str(tmp_path))


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(str(tmp_path))
