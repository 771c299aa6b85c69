"""What an engine (or a front end that only needs the tokenizer) sets up before it runs:
the device, the tokenizer and the default sampling parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kestrel.config import EngineConfig
from kestrel.loader import read_generation_config
from kestrel.loader.gguf_loader import GGUFFile
from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer
from kestrel.model_source import ModelSource
from kestrel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def sampling_defaults(setting: str, model_generation_config: dict) -> dict:
    """The generation config the default sampling parameters come from (`--generation-config`):
    "auto" the model's, "vllm" none (SamplingParams' own defaults), else the
    generation_config.json in that folder (which must exist). The model's EOS ids are used in
    every case."""
    if setting == "auto":
        return model_generation_config
    if setting == "vllm":
        return {}
    folder = Path(setting).expanduser()
    if not (folder / "generation_config.json").is_file():
        raise ValueError(
            f"generation_config = {setting!r} is invalid; allowed: auto, vllm, or a folder "
            "holding a generation_config.json"
        )
    return read_generation_config(folder)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def load_tokenizer(
    config: EngineConfig, source: ModelSource, gguf_file: GGUFFile | None = None
) -> Tokenizer | None:
    """The tokenizer of `config` (its `tokenizer` path, else the model's own), without loading
    the model: a front end process needs only this. None when a model directory has no
    tokenizer.json (then only token-id prompts are accepted)."""
    path = Path(config.tokenizer) if config.tokenizer is not None else source.path
    if path.suffix.lower() == ".gguf":
        if gguf_file is None or config.tokenizer is not None:
            gguf_file = GGUFFile(path)
        return load_gguf_tokenizer(gguf_file)
    if config.tokenizer is None and not (path / "tokenizer.json").is_file():
        logger.warning("%s has no tokenizer.json: only token-id prompts are accepted", path)
        return None
    return Tokenizer.from_dir(path)


def as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]
