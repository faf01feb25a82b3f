"""Model code: T5 (original, v1.1 / Flan-T5) and Llama over a paged KV cache.

The engine needs `load_model`, `KVCacheSpec`/`KVCachePool`, `SequenceKV` and `ModelRunner`.
"""

from exegpt.models.config import ModelConfig, config_hash
from exegpt.models.defaults import DEFAULT_MODEL_NAME
from exegpt.models.kv_cache import (
    KVCacheFull,
    KVCachePool,
    KVCacheSpec,
    SequenceKV,
    num_blocks_needed,
)
from exegpt.models.loader import LoadedModel, ModelNotFoundError, load_model, save_default_model
from exegpt.models.runner import ModelRunner
from exegpt.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ByteTokenizer",
    "HFTokenizer",
    "KVCacheFull",
    "KVCachePool",
    "KVCacheSpec",
    "LoadedModel",
    "ModelConfig",
    "ModelNotFoundError",
    "ModelRunner",
    "SequenceKV",
    "Tokenizer",
    "config_hash",
    "load_model",
    "num_blocks_needed",
    "save_default_model",
]
