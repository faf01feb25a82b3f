"""A checkpoint that breaks the model for one token: the poisoned request of the reliability
tests and of benchmarks/soak.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exegpt.models.loader import save_default_model

POISON_TOKEN = 383  # the tiny model never produces it for the tests' greedy prompts


def save_poisoned_model(directory: Path) -> Path:
    """The embedded model as a checkpoint, embedding row POISON_TOKEN NaN, head untied."""
    path = save_default_model(directory)
    config = json.loads((path / "config.json").read_text())
    weights = load_file(path / "model.safetensors")
    shared = weights["shared.weight"]
    # The tied head scaled the decoder output by d_model**-0.5: fold that into the copy.
    weights["lm_head.weight"] = shared.clone() * config["d_model"] ** -0.5
    weights["shared.weight"] = shared.clone()
    weights["shared.weight"][POISON_TOKEN] = torch.nan
    save_file(weights, path / "model.safetensors")
    config.update(tie_word_embeddings=False, scale_decoder_outputs=False)
    (path / "config.json").write_text(json.dumps(config))
    return path
