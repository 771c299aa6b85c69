"""Qwen2 / Qwen2.5: biases on q/k/v (always), none on o_proj or the MLP.

Config fields (read in `ModelConfig`): the fixed q/k/v bias, `tie_word_embeddings` (small
models), `sliding_window` / `use_sliding_window` (recorded; attention is full).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

from kestrel.models.blocks import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    packed_modules_mapping: ClassVar[Mapping[str, Sequence[str]]] = MappingProxyType(
        {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    )
