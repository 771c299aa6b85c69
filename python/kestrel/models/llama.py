"""Llama 2/3 (and Llama-layout checkpoints, e.g. SmolLM or GGUF `llama` files).

Config fields (read in `ModelConfig`): `attention_bias` (q/k/v and o_proj), `mlp_bias`,
`head_dim`, `rope_scaling` (llama3, linear, ...), `tie_word_embeddings`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

from kestrel.models.blocks import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    packed_modules_mapping: ClassVar[Mapping[str, Sequence[str]]] = MappingProxyType(
        {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    )
