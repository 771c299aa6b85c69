"""Model implementations and the architecture registry."""

from kestrel.models.llama import LlamaForCausalLM
from kestrel.models.registry import MODEL_REGISTRY, get_model_class, supported_architectures

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "get_model_class", "supported_architectures"]
