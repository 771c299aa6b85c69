"""The dtype a model runs in, from a flag value and the checkpoint's config."""

from __future__ import annotations

import logging

import torch

from kestrel.model_config import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(
    dtype: torch.dtype | str | None, config: ModelConfig, device: torch.device
) -> torch.dtype:
    """Model dtype: an explicit torch dtype or name, or "auto"/None = the checkpoint's dtype
    (float32 if config.json names none), except that float32 becomes bfloat16 on a GPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; supported: float32/16, bfloat16")
        return dtype
    if dtype is None or dtype == "auto":
        chosen = _DTYPES[config.dtype] if config.dtype is not None else torch.float32
        if chosen == torch.float32 and device.type == "cuda":
            logger.info("checkpoint dtype is float32; running in bfloat16 on %s", device)
            chosen = torch.bfloat16
        return chosen
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; supported: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
