"""KV-cache scales from a checkpoint: per-layer k_scale / v_scale for an FP8 KV cache.

Names read (the layer index as the model sees it, after pipeline-stage renaming):
`model.layers.N.self_attn.k_scale` / `v_scale` (llm-compressor / compressed-tensors, whose
`kv_cache_scheme` layers/quant_config.py accepts; also `self_attn.attn.k_scale`, vLLM's own
module name) and `model.layers.N.self_attn.k_proj.output_scale` / `v_proj.output_scale`
(AutoFP8's older convention). Each sets `k_scale` / `v_scale` of that layer's
`layers.PagedAttention` (a float: stored code = x / scale). A tensor of several values
(per-head scales) becomes its maximum: one per-tensor scale at least as large as each, so
nothing saturates that would not have. Attention-input scales (`self_attn.q_scale`,
`prob_scale`) are read past: Kestrel does not quantize the attention inputs.

With a cache of the model's dtype the scales are loaded but unused (ops/kv_quant.py).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

_SCALE_NAME = re.compile(
    r"^(?P<layer>model\.layers\.\d+)\.self_attn\."
    r"(?:(?:attn\.)?(?P<kv>[kv])_scale|(?P<proj>[kv])_proj\.output_scale"
    r"|(?:attn\.)?(?P<other>q|prob)_scale)$"
)


def scale_value(name: str, tensor: torch.Tensor) -> float:
    """The per-tensor scale a checkpoint tensor gives: its value, or the maximum of several;
    ValueError naming the tensor unless finite and > 0."""
    if tensor.numel() == 0:
        raise ValueError(f"checkpoint tensor {name!r} is empty; a KV scale needs a value > 0")
    value = float(tensor.detach().float().max())
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"checkpoint tensor {name!r} = {value!r}; allowed: a finite float > 0")
    return value


def take_kv_scales(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` without the KV-scale tensors, whose values are set on `model`'s attention
    layers (`<layer>.self_attn.attn`) as the stream is consumed."""
    modules = dict(model.named_modules())
    noted = False
    for name, tensor in weights:
        match = _SCALE_NAME.match(name)
        if match is None:
            yield name, tensor
            continue
        if match["other"] is not None:
            continue  # attention-input scales: not used
        attn = modules.get(f"{match['layer']}.self_attn.attn")
        if attn is None or not hasattr(attn, "k_scale"):
            raise ValueError(f"checkpoint tensor {name!r}: the model has no such attention layer")
        which = match["kv"] or match["proj"]
        setattr(attn, f"{which}_scale", scale_value(name, tensor))
        if not noted:
            logger.info("KV-cache scales found in the checkpoint (used by an FP8 KV cache)")
            noted = True
