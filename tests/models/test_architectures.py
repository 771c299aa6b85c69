"""One class per architecture, packed-module name mapping (HF and GGUF names), KV-cache specs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kestrel.layers import SINGLE_RANK
from kestrel.loader.gguf_loader import hf_tensor_name
from kestrel.model_config import FullAttentionSpec, KVCacheSpec, ModelConfig, SlidingWindowSpec
from kestrel.models import DecoderForCausalLM, get_model_class, supported_architectures
from kestrel.models.weights import checkpoint_name, map_checkpoint_name
from tests.models.test_model_config import base_config

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.mark.parametrize("arch", supported_architectures())
def test_each_architecture_has_its_own_class(arch: str) -> None:
    cls = get_model_class(arch)
    assert cls.__name__ == arch and issubclass(cls, DecoderForCausalLM)
    assert cls.__module__ == f"kestrel.models.{arch.removesuffix('ForCausalLM').lower()}"
    assert "packed_modules_mapping" in vars(cls)  # declared by the class itself
    assert {k: tuple(v) for k, v in cls.packed_modules_mapping.items()} == PACKED


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.q_proj.weight", ("model.layers.3.self_attn.qkv_proj.weight", 0)),
        ("model.layers.3.self_attn.v_proj.bias", ("model.layers.3.self_attn.qkv_proj.bias", 2)),
        ("model.layers.0.mlp.up_proj.weight", ("model.layers.0.mlp.gate_up_proj.weight", 1)),
        ("model.layers.0.mlp.down_proj.weight", ("model.layers.0.mlp.down_proj.weight", None)),
        (
            "model.layers.0.self_attn.o_proj.weight",
            ("model.layers.0.self_attn.o_proj.weight", None),
        ),
        (
            "model.layers.0.self_attn.q_norm.weight",
            ("model.layers.0.self_attn.q_norm.weight", None),
        ),
        ("lm_head.weight", ("lm_head.weight", None)),
    ],
)
def test_checkpoint_names_map_through_the_packed_modules(name: str, expected) -> None:
    assert map_checkpoint_name(name, PACKED) == expected
    param_name, index = expected
    shard_ids = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}
    packed = param_name.split(".")[-2]
    shard = None if index is None else shard_ids[packed][index]
    assert checkpoint_name(param_name, shard, shard_ids.get(packed, ()), PACKED) == name


@pytest.mark.parametrize(
    ("gguf_name", "param_name", "shard_id"),
    [
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.qkv_proj.weight", "q"),
        ("blk.1.attn_k.bias", "model.layers.1.self_attn.qkv_proj.bias", "k"),
        ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_up_proj.weight", 0),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.gate_up_proj.weight", 1),
        ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj.weight", None),
        ("token_embd.weight", "model.embed_tokens.weight", None),
    ],
)
def test_gguf_names_reach_the_packed_shards(gguf_name: str, param_name: str, shard_id) -> None:
    overrides = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}
    config = ModelConfig.from_hf_config(base_config(attention_bias=True, **overrides))
    model = get_model_class("LlamaForCausalLM")(config)
    name = hf_tensor_name(gguf_name)
    assert name is not None
    mapped, index = map_checkpoint_name(name, model.packed_modules_mapping)
    assert mapped == param_name
    param = dict(model.named_parameters())[mapped]
    assert (None if index is None else param.shard_ids[index]) == shard_id


def test_models_default_to_the_size_one_group() -> None:
    config = ModelConfig.from_hf_config(base_config(num_hidden_layers=1))
    model = get_model_class("Qwen3ForCausalLM")(config)
    assert model.tp_group is SINGLE_RANK
    layers = [m for m in model.modules() if hasattr(m, "tp_group")]
    assert layers and all(m.tp_group is SINGLE_RANK for m in layers)


def test_kv_cache_specs_default_to_full_attention_per_layer() -> None:
    config = ModelConfig.from_hf_config(base_config(sliding_window=1024))
    assert config.kv_cache_specs == (FullAttentionSpec(num_kv_heads=2, head_dim=32),) * 3
    assert config.kv_cache_specs[0].bytes_per_token(2) == 2 * 2 * 32 * 2


def test_sliding_window_spec_is_expressible_and_validated() -> None:
    config = ModelConfig.from_hf_config(base_config(num_hidden_layers=2))
    window = SlidingWindowSpec(2, 32, window=4096)
    mixed = dataclasses.replace(config, kv_cache_specs=(window, FullAttentionSpec(2, 32)))
    assert (
        isinstance(mixed.kv_cache_specs[0], KVCacheSpec) and mixed.kv_cache_specs[0].window == 4096
    )
    with pytest.raises(ValueError, match="one KVCacheSpec per layer"):
        dataclasses.replace(config, kv_cache_specs=(window,))
    with pytest.raises(ValueError, match="window=0 must be > 0"):
        SlidingWindowSpec(2, 32, window=0)
    with pytest.raises(ValueError, match="num_kv_heads=0"):
        FullAttentionSpec(0, 32)


def test_load_model_runs_the_post_load_hook(tmp_path: Path, monkeypatch) -> None:
    import kestrel.loader.load as load_module

    config = base_config(num_hidden_layers=1, vocab_size=64, hidden_size=32, intermediate_size=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    seen: list[torch.nn.Module] = []
    monkeypatch.setattr(load_module, "process_weights_after_loading", seen.append)
    model, _ = load_module.load_model(tmp_path, load_format="dummy")
    assert seen == [model]
