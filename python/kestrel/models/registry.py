"""Map from config.json `architectures` names to Kestrel model classes."""

from __future__ import annotations

from types import MappingProxyType

from torch import nn

from kestrel.models.llama import LlamaForCausalLM
from kestrel.models.mistral import MistralForCausalLM
from kestrel.models.qwen2 import Qwen2ForCausalLM
from kestrel.models.qwen3 import Qwen3ForCausalLM

# Read-only: architecture name (as in config.json) -> model class.
MODEL_REGISTRY: MappingProxyType[str, type[nn.Module]] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": MistralForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }
)


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class implementing `architecture`; ValueError listing the supported ones if none."""
    model_class = MODEL_REGISTRY.get(architecture)
    if model_class is None:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    return model_class
