"""Load a model by name: the embedded default, or a Hugging Face safetensors checkpoint dir."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from exegpt.chat import ChatTemplate, read_chat_template
from exegpt.models.checkpoint import Model, create_model, list_tensors, load_weights, save_weights
from exegpt.models.config import ModelConfig
from exegpt.models.defaults import (
    DEFAULT_MODEL_NAME,
    build_default_model,
    default_model_config,
)
from exegpt.models.hub_cache import HubCacheMissError, looks_like_repo_id, resolve_cached_model
from exegpt.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

logger = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"


class ModelNotFoundError(ValueError):
    """The name is neither the embedded default model nor a usable checkpoint directory."""


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: Model
    tokenizer: Tokenizer | None  # None: the model takes token-id prompts only
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    chat_template: ChatTemplate | None = None  # None: the fallback (exegpt/chat.py)


def load_model(
    name_or_path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> LoadedModel:
    """Load `DEFAULT_MODEL_NAME`, an HF checkpoint directory (config.json + *.safetensors) or
    a Hub id `org/name` from the local Hugging Face cache (`checkpoint_directory`).

    `name` overrides the served name (default: the model name, or the directory's name).
    """
    torch_device = torch.device(device)
    if name_or_path == DEFAULT_MODEL_NAME:
        model = build_default_model(torch_device, dtype)
        return LoadedModel(
            name or DEFAULT_MODEL_NAME, model.config, model, ByteTokenizer(), dtype, torch_device
        )
    directory, served_name = checkpoint_directory(name_or_path)
    config = _read_config(directory)
    model = create_model(config, device=torch_device, dtype=dtype)
    load_weights(model, config, _tensor_files(directory))
    tokenizer = _read_tokenizer(directory, config)
    logger.info("loaded %s (%s) from %s", config.family, dtype, directory)
    served_name = name or served_name
    return LoadedModel(
        served_name, config, model, tokenizer, dtype, torch_device, read_chat_template(directory)
    )


@dataclass(frozen=True)
class ModelCard:
    """What a process that runs no layers needs of a model (an engine over pipeline stages):
    its served name, config and tokenizer, without the weights."""

    name: str
    config: ModelConfig
    tokenizer: Tokenizer | None
    dtype: torch.dtype = torch.float32
    # What the stages are told to load: the embedded model's name or an absolute directory
    # (for a Hub id, its snapshot in the local cache).
    source: str = DEFAULT_MODEL_NAME
    chat_template: ChatTemplate | None = None


def read_model_card(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, name: str | None = None
) -> ModelCard:
    if name_or_path == DEFAULT_MODEL_NAME:
        return ModelCard(name or DEFAULT_MODEL_NAME, default_model_config(), ByteTokenizer(), dtype)
    directory, served_name = checkpoint_directory(name_or_path)
    config = _read_config(directory)
    served_name = name or served_name
    tokenizer = _read_tokenizer(directory, config)
    return ModelCard(
        served_name,
        config,
        tokenizer,
        dtype,
        str(directory.resolve()),
        read_chat_template(directory),
    )


def checkpoint_directory(name_or_path: str) -> tuple[Path, str]:
    """The checkpoint directory `name_or_path` names, and the name it is served under: a
    directory (served as its own name) or a Hub id `org/name[@revision]` found in the local
    Hugging Face cache (served as `org/name`; never downloaded)."""
    directory = Path(name_or_path)
    if directory.is_dir():
        return directory, directory.resolve().name
    if not looks_like_repo_id(name_or_path):
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: expected {DEFAULT_MODEL_NAME!r}, a directory "
            "holding a Hugging Face checkpoint (config.json + *.safetensors) or a model id "
            "(org/name) in the local Hugging Face cache"
        )
    try:
        snapshot = resolve_cached_model(name_or_path)
    except HubCacheMissError as exc:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: expected {DEFAULT_MODEL_NAME!r}, a checkpoint "
            f"directory or a model id in the local Hugging Face cache; {exc}"
        ) from exc
    return snapshot, name_or_path.partition("@")[0]


def save_default_model(directory: str | Path) -> Path:
    """Write the default model as an HF-style dir (config.json, model.safetensors, and a
    tokenizer.json equivalent to its ByteTokenizer)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model = build_default_model()
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    save_weights(model, model.config, path / "model.safetensors")
    ByteTokenizer().to_hf().save(str(path / "tokenizer.json"))
    return path


def _read_config(directory: Path) -> ModelConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{directory} has no config.json; it is not a model checkpoint")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    return ModelConfig.from_hf_dict(hf)


def _tensor_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (sharded or single file)."""
    index_path = directory / _INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise ModelNotFoundError(f"{directory} lacks shards listed in {_INDEX_FILE}: {missing}")
        return {tensor: directory / file for tensor, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(
            f"{directory} has no *.safetensors weights (pickled .bin checkpoints are not "
            "loaded; convert them to safetensors)"
        )
    return {tensor: path for path in files for tensor in list_tensors(path)}


def _read_tokenizer(directory: Path, config: ModelConfig) -> Tokenizer | None:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    return HFTokenizer.from_file(path, config.eos_token_id)
