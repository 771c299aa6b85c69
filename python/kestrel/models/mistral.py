"""Mistral: Llama's layout without biases; GQA.

Config fields (read in `ModelConfig`): `head_dim` (may be null: hidden_size / heads),
`sliding_window` (recorded and warned about: attention is full in every layer, so outputs past
the window may differ; `SlidingWindowSpec` can express it once the engine supports it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

from kestrel.models.blocks import DecoderForCausalLM


class MistralForCausalLM(DecoderForCausalLM):
    packed_modules_mapping: ClassVar[Mapping[str, Sequence[str]]] = MappingProxyType(
        {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    )
