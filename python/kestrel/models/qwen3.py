"""Qwen3: per-head RMSNorm of q and k (`self_attn.q_norm` / `k_norm`) before RoPE.

Config fields (read in `ModelConfig`): the fixed q/k norm, `attention_bias`, `head_dim` (often
not hidden_size / heads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

from kestrel.models.blocks import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    packed_modules_mapping: ClassVar[Mapping[str, Sequence[str]]] = MappingProxyType(
        {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    )
