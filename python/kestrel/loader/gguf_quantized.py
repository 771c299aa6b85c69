"""Which linear layers of a GGUF model keep their file's quantized blocks on the device.

A linear layer keeps its weight as raw GGUF blocks (`GGUFLinearMethod`) when every checkpoint
tensor fused into it (q/k/v, gate/up, or the one tensor of a plain layer) is stored in a type
with kernels (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K; the parts may differ, e.g. Q4_K q/k with a Q6_K v).
Every other tensor is dequantized to the run dtype as before; the embeddings and the LM head
always are.

By default the blocks are kept on CUDA devices only, and only where the GGUF kernels can run
(built, and verified on a GPU or allowed by KESTREL_UNVERIFIED_KERNELS=1: `_dispatch.
UNVERIFIED_OPS`), so an unverified build dequantizes as before; `KESTREL_GGUF_QUANTIZED=1`
keeps them on any device (where the kernels cannot run, the torch reference dequantizes them
on every call: tests), `0` never.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from kestrel.layers.gguf_linear import GGUFLinearMethod, gguf_weight_bytes
from kestrel.layers.linear import LinearMethodBase
from kestrel.models.weights import map_checkpoint_name
from kestrel.ops.gguf import KERNEL_TYPES, gguf_kernels_usable

logger = logging.getLogger(__name__)

KEEP_QUANTIZED_ENV = "KESTREL_GGUF_QUANTIZED"
_KEEP_CHOICES = ("auto", "0", "1")


def keep_quantized(device: torch.device, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether GGUF linears keep their blocks on `device` (see the module docstring)."""
    value = environ.get(KEEP_QUANTIZED_ENV, "auto")
    if value not in _KEEP_CHOICES:
        raise ValueError(f"{KEEP_QUANTIZED_ENV}={value!r}; expected one of {_KEEP_CHOICES}")
    if value == "1":
        return True
    return value == "auto" and device.type == "cuda" and gguf_kernels_usable()


@dataclass
class GGUFQuantConfig:
    """Per linear layer prefix, the GGML type of each of its parts (a quant_config for the
    model constructors). Records the layers that took a GGUF method, so the loader yields raw
    blocks for exactly their tensors."""

    part_types: dict[str, tuple[GGMLQuantizationType, ...]]
    part_tensors: dict[str, tuple[str, ...]]  # prefix -> GGUF tensor names of its parts
    used: set[str] = field(default_factory=set)

    # The model constructors' quant_config protocol (as kestrel.layers.quant_config.Fp8Config).
    ignored_checkpoint_suffixes: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return f"GGUF blocks ({len(self.part_types)} layers kept quantized where their types allow)"

    def methods_for(self, packed_modules_mapping: Mapping[str, Sequence[str]]):
        """The per-prefix method lookup the decoder blocks call (`LinearMethods`)."""
        return self.get_linear_method

    def get_linear_method(self, prefix: str) -> LinearMethodBase | None:
        types = self.part_types.get(prefix)
        if types is None:
            return None
        self.used.add(prefix)
        return GGUFLinearMethod(types)

    def raw_tensor_names(self) -> frozenset[str]:
        """GGUF tensor names to load as raw blocks (those of the layers that kept them)."""
        return frozenset(name for prefix in self.used for name in self.part_tensors[prefix])


def gguf_quant_config(
    tensors: Sequence[tuple[str | None, str, int]],
    packed_modules_mapping: Mapping[str, Sequence[str]],
) -> GGUFQuantConfig:
    """tensors: (HF name or None, GGUF name, GGML type id) of every tensor of the file.

    A candidate is a 2-D `.weight` under `model.layers.`; it is grouped with the other parts
    of its (packed) layer, and the layer qualifies when all its parts are present and of a
    kernel type."""
    parts: dict[str, dict[int, tuple[str, GGMLQuantizationType]]] = {}
    sizes: dict[str, int] = {}
    for hf_name, gguf_name, type_id in tensors:
        if (
            hf_name is None
            or not hf_name.startswith("model.layers.")
            or not hf_name.endswith(".weight")
        ):
            continue
        try:
            qtype = GGMLQuantizationType(int(type_id))
        except ValueError:
            continue  # the dequantizing path names the unknown type
        param_name, index = map_checkpoint_name(hf_name, packed_modules_mapping)
        prefix = param_name.removesuffix(".weight")
        packed = prefix.rsplit(".", 1)[-1]
        sizes[prefix] = len(packed_modules_mapping[packed]) if index is not None else 1
        parts.setdefault(prefix, {})[0 if index is None else index] = (gguf_name, qtype)
    part_types: dict[str, tuple[GGMLQuantizationType, ...]] = {}
    part_tensors: dict[str, tuple[str, ...]] = {}
    for prefix, found in parts.items():
        if sorted(found) != list(range(sizes[prefix])):
            continue  # a part missing: the loader reports it
        ordered = [found[i] for i in range(sizes[prefix])]
        if all(qtype in KERNEL_TYPES for _, qtype in ordered):
            part_types[prefix] = tuple(qtype for _, qtype in ordered)
            part_tensors[prefix] = tuple(name for name, _ in ordered)
    return GGUFQuantConfig(part_types, part_tensors)


def raw_gguf_blocks(data: np.ndarray) -> torch.Tensor:
    """A quantized GGUF tensor's memory-mapped bytes uint8 [rows, row_bytes] as a CPU tensor
    (copied out of the read-only map)."""
    return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))


def log_weight_memory(model: nn.Module, device: torch.device) -> None:
    """One log line: the model's weight GiB on the device and what stays in GGUF blocks."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    kept = gguf_weight_bytes(model)
    detail = ", ".join(f"{name} {n / 2**30:.2f} GiB" for name, n in sorted(kept.items()))
    logger.info(
        "weights: %.2f GiB on %s%s",
        total / 2**30,
        device,
        f" (kept as GGUF blocks: {detail})" if kept else "",
    )
