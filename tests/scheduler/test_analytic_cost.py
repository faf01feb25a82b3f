"""The analytic cost model describes a model through its one `ModelConfig`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from exegpt.models.defaults import DEFAULT_MODEL_NAME, default_model_config
from services.scheduler.analytic_cost import (
    DEFAULT_ANALYTIC_MODEL,
    analytic_cost_model,
    arch_from_hf_config,
    model_preset,
)


def _write_config(directory: Path, hf: dict[str, object]) -> Path:
    (directory / "config.json").write_text(json.dumps(hf))
    return directory


def test_the_default_preset_is_the_embedded_model_read_as_its_config(tmp_path: Path) -> None:
    hf = {**default_model_config().to_hf_dict(), "torch_dtype": "float32"}
    from_file = arch_from_hf_config(_write_config(tmp_path, hf))
    preset = model_preset(DEFAULT_ANALYTIC_MODEL)
    assert DEFAULT_ANALYTIC_MODEL == DEFAULT_MODEL_NAME
    assert replace(from_file, name=preset.name) == preset
    assert analytic_cost_model("cpu").shape == preset.shape


def test_a_config_the_workers_cannot_read_is_refused_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        arch_from_hf_config(_write_config(tmp_path, {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a usable model config"):
        arch_from_hf_config(_write_config(tmp_path, {"model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown analytic model 'gpt-5'"):
        analytic_cost_model("a40:gpt-5")
