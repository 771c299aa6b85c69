"""ModelConfig.from_hf_config on transformers 4.x- and 5.x-style config dicts."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kestrel.model_config import ModelConfig


def base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def test_llama_geometry_and_defaults() -> None:
    config = ModelConfig.from_hf_config(base_config())
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 32)
    assert (config.q_size, config.kv_size) == (256, 64)
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert not (config.qkv_bias or config.o_proj_bias or config.qk_norm or config.mlp_bias)
    assert config.tie_word_embeddings is False
    assert config.dtype == "bfloat16"
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)


def test_missing_kv_heads_defaults_to_heads_and_explicit_head_dim_wins() -> None:
    config = ModelConfig.from_hf_config(base_config(num_key_value_heads=None, head_dim=64))
    assert config.num_key_value_heads == 8
    assert config.head_dim == 64 and config.q_size == 512
    # head_dim: null (Mistral configs) falls back to hidden_size / heads.
    assert ModelConfig.from_hf_config(base_config(head_dim=None)).head_dim == 32


def test_rope_parameters_and_legacy_rope_scaling_agree() -> None:
    llama3 = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v5 = ModelConfig.from_hf_config(
        base_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama3})
    )
    legacy = ModelConfig.from_hf_config(
        base_config(rope_theta=500000.0, rope_scaling={"type": "llama3", **llama3})
    )
    assert v5.rope_theta == legacy.rope_theta == 500000.0
    assert v5.rope_scaling == legacy.rope_scaling == {"rope_type": "llama3", **llama3}


def test_default_rope_type_means_no_scaling() -> None:
    v5 = ModelConfig.from_hf_config(
        base_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    assert (v5.rope_theta, v5.rope_scaling) == (1e6, None)
    legacy = ModelConfig.from_hf_config(base_config(rope_theta=5e5, rope_scaling=None))
    assert (legacy.rope_theta, legacy.rope_scaling) == (5e5, None)


def test_family_switches() -> None:
    qwen2 = ModelConfig.from_hf_config(
        base_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    )
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = ModelConfig.from_hf_config(
        base_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False)
    )
    assert (qwen3.qkv_bias, qwen3.o_proj_bias, qwen3.qk_norm) == (False, False, True)
    biased = ModelConfig.from_hf_config(base_config(attention_bias=True, mlp_bias=True))
    assert (biased.qkv_bias, biased.o_proj_bias, biased.mlp_bias) == (True, True, True)


def test_dtype_key_and_token_id_lists() -> None:
    config = ModelConfig.from_hf_config(
        base_config(torch_dtype=None, dtype="float16", bos_token_id=[7, 8], eos_token_id=[5, 6])
    )
    assert config.dtype == "float16"
    assert config.bos_token_id == 7 and config.eos_token_ids == (5, 6)
    bare = ModelConfig.from_hf_config(base_config(torch_dtype=None, eos_token_id=None))
    assert bare.dtype is None and bare.eos_token_ids == ()


@pytest.mark.parametrize("key", ["vocab_size", "architectures", "num_attention_heads"])
def test_missing_required_key_names_key_and_file(key: str) -> None:
    config = base_config()
    del config[key]
    with pytest.raises(ValueError, match=rf"config\.json.*'{key}'"):
        ModelConfig.from_hf_config(config)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'.*silu"),
        ({"num_key_value_heads": 3}, r"num_attention_heads=8.*num_key_value_heads=3"),
        ({"hidden_size": 250, "head_dim": None}, r"hidden_size=250"),
        ({"vocab_size": 0}, r"vocab_size=0"),
        ({"torch_dtype": "int8"}, r"dtype='int8'"),
        ({"eos_token_id": "x"}, r"eos_token_id='x'"),
    ],
)
def test_invalid_values_are_named(overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ModelConfig.from_hf_config(base_config(**overrides))


def test_sliding_window_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kestrel.model_config"):
        config = ModelConfig.from_hf_config(base_config(sliding_window=1024))
    assert config.sliding_window == 1024
    assert "sliding_window=1024" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kestrel.model_config"):
        ModelConfig.from_hf_config(base_config(sliding_window=1024, use_sliding_window=False))
        ModelConfig.from_hf_config(base_config(sliding_window=8192))  # >= max positions
    assert caplog.text == ""
