"""Model implementations (one file per architecture over `blocks`) and the registry."""

from kestrel.models.blocks import DecoderForCausalLM
from kestrel.models.llama import LlamaForCausalLM
from kestrel.models.mistral import MistralForCausalLM
from kestrel.models.qwen2 import Qwen2ForCausalLM
from kestrel.models.qwen3 import Qwen3ForCausalLM
from kestrel.models.registry import MODEL_REGISTRY, get_model_class, supported_architectures

__all__ = [
    "MODEL_REGISTRY",
    "DecoderForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "get_model_class",
    "supported_architectures",
]
