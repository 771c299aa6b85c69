"""Test helper: FP8 checkpoints written from a tiny BF16/FP32 model directory, in the two
published layouts (compressed-tensors / llm-compressor `float-quantized`, and vLLM / AutoFP8
`quant_method: "fp8"`), with the linear weights as float8_e4m3fn and `weight_scale` tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kestrel.layers.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows

LINEAR_SUFFIXES = tuple(
    f"{module}.weight"
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
)


def compressed_tensors_config(
    strategy: str, ignore: list[str], static_input: bool = False
) -> dict[str, Any]:
    """config.json's `quantization_config` as llm-compressor writes it for FP8."""
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
    }
    activations = {
        **weights,
        "dynamic": not static_input,
        "observer": None,
        "strategy": "tensor" if static_input else "token",
    }
    return {
        "config_groups": {
            "group_0": {
                "input_activations": activations,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": 1.5,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def fp8_method_config(ignore: list[str], activation_scheme: str = "dynamic") -> dict[str, Any]:
    """vLLM's / AutoFP8's `quant_method: "fp8"` config (per-tensor weight scales)."""
    return {
        "quant_method": "fp8",
        "activation_scheme": activation_scheme,
        "ignored_layers": ignore,
    }


def write_fp8_checkpoint(
    source: Path,
    dest: Path,
    quantization_config: dict[str, Any],
    *,
    strategy: str,
    skip: tuple[str, ...] = (),
    input_scales: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Copy the model directory `source` to `dest` with its linear weights in FP8: per-channel
    ([N, 1]) or per-tensor (scalar) `weight_scale`, in `scale_dtype`; modules whose name ends
    with one of `skip` stay as they are (list them in the config's ignore list)."""
    shutil.copytree(source, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if not name.endswith(LINEAR_SUFFIXES) or module.endswith(skip):
            out[name] = tensor
            continue
        if strategy == "channel":
            q, scale = quantize_rows(tensor)  # scale [N, 1]
        else:
            scale = (tensor.abs().max().float() / FP8_MAX).reshape(())
            q = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out[name] = q
        out[f"{module}.weight_scale"] = scale.to(scale_dtype)
        if input_scales:
            out[f"{module}.input_scale"] = torch.tensor([0.05], dtype=scale_dtype)
    (dest / "model.safetensors").unlink()
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config, indent=2))
    return dest
