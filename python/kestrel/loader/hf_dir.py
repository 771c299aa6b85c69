"""Reading a Hugging Face model directory: config.json, generation_config.json, safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kestrel.loader.load_report import byte_progress
from kestrel.loader.safetensors_file import SafetensorsFile, as_typed
from kestrel.loader.staging import DeviceStager
from kestrel.model_config import ModelConfig

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"


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


def iter_safetensors_weights(
    files: list[Path], device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor on `device` in its checkpoint dtype) one tensor at a time, in file
    order. The bytes go straight from the memory-mapped file to the device (`DeviceStager`:
    pinned staging overlapped with the next read on CUDA; on CPU a copy-on-write view of the
    mapping, no copy), and dtype conversions happen where the model's loaders copy them into
    its parameters, on the device. Every file's header is checked before any tensor is read;
    one byte progress bar covers all files."""
    opened = []
    for file in files:
        try:
            opened.append(SafetensorsFile(file))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read checkpoint file {file}: {exc}") from exc
    total_bytes = sum(f.num_bytes for f in opened)
    progress = byte_progress(total_bytes, "Loading safetensors")
    with progress, DeviceStager(device, progress=progress.update) as stager:
        for handle in opened:
            for entry in handle.entries:
                yield entry.name, as_typed(stager.to_device(handle.raw(entry)), entry)
