"""Reading a Hugging Face model directory: config.json, generation_config.json, safetensors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from kestrel.model_config import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
# Below this many checkpoint bytes no progress bar is shown.
_PROGRESS_MIN_BYTES = 1 << 30


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        # A well-formed file of the wrong shape is still a malformed config: ValueError.
        raise ValueError(  # noqa: TRY004
            f"{path} must hold a JSON object, got {type(data).__name__}"
        )
    return data


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse `<model_dir>/config.json`; errors name the file."""
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found (looking for {path})")
    raw = read_json_object(path)
    try:
        return ModelConfig.from_hf_config(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def read_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """Contents of `<model_dir>/generation_config.json`, or {} when the file is absent."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.exists():
        return {}
    return read_json_object(path)


def find_safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint files of `model_dir`: the shards named by model.safetensors.index.json
    (sorted, each checked to exist) or the single model.safetensors.

    Raises FileNotFoundError naming the missing shard, or saying no checkpoint was found.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / SAFETENSORS_INDEX_FILE
    if index_path.exists():
        index = read_json_object(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' object")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(
                    f"checkpoint shard {file.name} listed in {index_path} is missing ({file})"
                )
        return files
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} in {model_dir}; "
        "use load_format='dummy' for random weights"
    )


def iter_safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) one tensor at a time, so at most one checkpoint tensor is
    held in host memory beyond the model's own parameters."""
    total_bytes = sum(file.stat().st_size for file in files)
    progress = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="Loading safetensors",
        disable=total_bytes < _PROGRESS_MIN_BYTES,
    )
    with progress:
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise ValueError(f"cannot read checkpoint file {file}: {exc}") from exc
            with handle as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    tensor = f.get_tensor(name)
                    yield name, tensor
                    progress.update(tensor.numel() * tensor.element_size())
    logger.info("loaded %d checkpoint file(s), %.1f MB", len(files), total_bytes / 1e6)
