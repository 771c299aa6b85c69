"""`load_model`: config.json -> model class from the registry -> weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kestrel.config import ConfigError
from kestrel.layers.linear import process_weights_after_loading
from kestrel.layers.parallel import SINGLE_RANK, TensorParallelGroup
from kestrel.layers.pipeline import SINGLE_STAGE, PipelineStage
from kestrel.layers.quant_config import fp8_config_for
from kestrel.loader.dtypes import resolve_dtype
from kestrel.loader.dummy import init_dummy_weights
from kestrel.loader.gguf_loader import load_gguf_model
from kestrel.loader.hf_dir import (
    find_safetensors_files,
    iter_safetensors_weights,
    read_model_config,
)
from kestrel.loader.load_report import LoadTimer
from kestrel.model_config import ModelConfig
from kestrel.models.registry import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

__all__ = ["LOAD_FORMATS", "load_model", "resolve_dtype"]


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    *,
    seed: int = 0,
    quantization: str | None = None,
    tp_group: TensorParallelGroup = SINGLE_RANK,
    pp_stage: PipelineStage = SINGLE_STAGE,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model of a Hugging Face directory (or a `.gguf` file) and fill its weights.

    load_format: "auto" / "safetensors" read model.safetensors or the shards listed in
    model.safetensors.index.json; "auto" / "gguf" read a `.gguf` file; "dummy" needs only the
    config (config.json or the GGUF metadata) and fills random weights (deterministic in
    `seed`). quantization: None, "fp8" (FP8 linear layers: a BF16/FP16 checkpoint quantized
    at load) or "gguf" (nothing here); an FP8 checkpoint (its config.json's
    `quantization_config`) loads as FP8 either way (kestrel.layers.quant_config). `tp_group`:
    this rank's shard of a tensor-parallel model (the weight loaders take its slices; dummy
    weights are random per rank, so they differ from the unsharded model's); `pp_stage`:
    this process's pipeline stage (its layers only). Returns (model in eval mode on
    `device`, its ModelConfig).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; supported: {LOAD_FORMATS}")
    model_dir = Path(model_dir)
    timer = LoadTimer()
    if model_dir.suffix.lower() == ".gguf" or load_format == "gguf":
        if load_format == "safetensors":
            raise ValueError(f"load_format='safetensors' cannot read the GGUF file {model_dir}")
        dummy = load_format == "dummy"
        return load_gguf_model(
            model_dir,
            dtype,
            device,
            dummy=dummy,
            seed=seed,
            quantization=quantization,
            tp_group=tp_group,
            pp_stage=pp_stage,
        )
    device = torch.device(device)
    config = read_model_config(model_dir)
    model_class = get_model_class(config.architecture)
    torch_dtype = resolve_dtype(dtype, config, device)
    # Locate (and check) every checkpoint file before allocating the model.
    files = None if load_format == "dummy" else find_safetensors_files(model_dir)
    try:
        quant_config = fp8_config_for(config.hf_config, quantization)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{model_dir / 'config.json'}: {exc}") from exc
    model = model_class(
        config,
        torch_dtype,
        device,
        quant_config=quant_config,
        tp_group=tp_group,
        pp_stage=pp_stage,
    )
    if files is None:
        init_dummy_weights(model, seed=seed)
    else:
        model.load_weights(iter_safetensors_weights(files, device))
    process_weights_after_loading(model)  # quant methods finish (repack) their weights
    model.eval()
    logger.info(
        "loaded %s from %s (%s, %s, format=%s, linear layers: %s)",
        config.architecture,
        model_dir,
        torch_dtype,
        device,
        load_format,
        quant_config.description if quant_config is not None else torch_dtype,
    )
    if files is not None:
        timer.finish(model, model_dir, device, sum(f.stat().st_size for f in files))
    return model, config
