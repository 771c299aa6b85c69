"""Random ("dummy") weights with the real shapes: for benchmarks and smoke tests."""

from __future__ import annotations

import torch
from torch import nn

from kestrel.layers.norm import RMSNorm

_FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place: RMSNorm weights 1.0, biases 0.0, FP8 weight scales 1.0
    (float8 weights are drawn in float32 and converted), everything else N(0, std^2).
    Deterministic for a given (seed, device); one generator per device."""
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if id(param) in norm_weights:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        elif name.endswith(".weight_scale"):
            param.fill_(1.0)
        else:
            generator = generators.get(param.device)
            if generator is None:
                generator = torch.Generator(device=param.device).manual_seed(seed)
                generators[param.device] = generator
            if param.dtype in _FLOAT8_DTYPES:  # normal_ has no float8 kernels
                drawn = torch.empty(param.shape, device=param.device)
                param.copy_(drawn.normal_(mean=0.0, std=std, generator=generator))
            else:
                param.normal_(mean=0.0, std=std, generator=generator)
