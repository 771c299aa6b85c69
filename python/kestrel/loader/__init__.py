"""Model loading: Hugging Face directories (safetensors) and dummy random weights."""

from kestrel.loader.dummy import init_dummy_weights
from kestrel.loader.hf_dir import (
    find_safetensors_files,
    iter_safetensors_weights,
    read_generation_config,
    read_model_config,
)
from kestrel.loader.load import LOAD_FORMATS, load_model, resolve_dtype

__all__ = [
    "LOAD_FORMATS",
    "find_safetensors_files",
    "init_dummy_weights",
    "iter_safetensors_weights",
    "load_model",
    "read_generation_config",
    "read_model_config",
    "resolve_dtype",
]
