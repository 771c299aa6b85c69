"""FP8 checkpoints load as published: compressed-tensors `float-quantized` (per-channel and
per-tensor scales, static input scales read past, an ignore list) and vLLM's `quant_method:
"fp8"` (per-tensor scales), written by the tests from a tiny model; what a config declares and
Kestrel does not support is refused naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kestrel.config import ConfigError
from kestrel.layers.fp8 import FP8_DTYPE
from kestrel.layers.quant_config import Fp8Config, fp8_config_for
from kestrel.loader import load_model
from kestrel.testing.tiny_models import make_tiny_model
from tests.models.fp8_checkpoints import (
    compressed_tensors_config,
    fp8_method_config,
    write_fp8_checkpoint,
)
from tests.models.fp8_compare import teacher_forced

PROMPT = [5, 77, 301, 12, 9, 400, 250, 3, 64, 128, 33]
# FP8 vs the unquantized tiny model (see test_fp8_model.py for the measured figures).
TINY_REL = 0.25


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("bf16"), "qwen2", with_tokenizer=False)


@pytest.fixture(scope="module")
def reference(source):
    model, config = load_model(source, dtype="float32")
    return teacher_forced(model, config, PROMPT), config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_compressed_tensors_channel_loads_exactly_as_quantize_at_load(source, tmp_path):
    """The file holds what quantizing at load computes, so both models give equal logits."""
    config = compressed_tensors_config("channel", ignore=["lm_head"])
    path = write_fp8_checkpoint(source, tmp_path / "ct", config, strategy="channel",
                                scale_dtype=torch.float32)  # fmt: skip
    serialized, mc = load_model(path, dtype="float32")
    at_load, _ = load_model(source, dtype="float32", quantization="fp8")
    assert serialized.quant_config.serialized and serialized.quant_config.weight_scale == "channel"
    qkv = serialized.model.layers[1].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8_DTYPE
    assert torch.equal(
        qkv.weight.view(torch.uint8), at_load.model.layers[1].self_attn.qkv_proj.weight.view(torch.uint8)
    )  # fmt: skip
    logits = teacher_forced(serialized, mc, PROMPT)
    assert torch.allclose(logits, teacher_forced(at_load, mc, PROMPT), rtol=0, atol=1e-5)
    # quantization="fp8" with an FP8 checkpoint: the same (it loads as published).
    again, _ = load_model(path, dtype="float32", quantization="fp8")
    assert torch.equal(teacher_forced(again, mc, PROMPT), logits)


@pytest.mark.parametrize(
    ("style", "strategy", "static"),
    [("compressed-tensors", "tensor", True), ("compressed-tensors", "channel", False),
     ("fp8", "tensor", False), ("fp8", "tensor", True)],
)  # fmt: skip
def test_fp8_checkpoints_close_to_the_original(
    source, reference, tmp_path, style, strategy, static
):
    ignore = ["model.layers.1.mlp.down_proj"]  # stays in the original dtype in the file
    if style == "fp8":
        qc = fp8_method_config(ignore, "static" if static else "dynamic")
    else:
        qc = compressed_tensors_config(strategy, ignore=["lm_head", *ignore], static_input=static)
    path = write_fp8_checkpoint(
        source, tmp_path / "ckpt", qc, strategy=strategy, skip=("layers.1.mlp.down_proj",),
        input_scales=static,
    )  # fmt: skip
    tensors = load_file(str(path / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    assert ("model.layers.0.self_attn.q_proj.input_scale" in tensors) == static
    model, mc = load_model(path, dtype="float32")
    layers = model.model.layers
    assert layers[0].mlp.down_proj.weight.dtype == FP8_DTYPE
    assert layers[1].mlp.down_proj.weight.dtype == torch.float32  # ignored: unquantized
    assert layers[1].mlp.gate_up_proj.weight.dtype == FP8_DTYPE
    expected, _ = reference
    assert _rel(teacher_forced(model, mc, PROMPT), expected) < TINY_REL


def test_per_tensor_scales_of_fused_parts_are_kept_apart(source, tmp_path):
    """q, k and v each carry their own scale; the fused layer must apply each to its rows."""
    path = write_fp8_checkpoint(
        source, tmp_path / "t", fp8_method_config([]), strategy="tensor", scale_dtype=torch.float32
    )
    tensors = load_file(str(path / "model.safetensors"))
    model, _ = load_model(path, dtype="float32")
    qkv = model.model.layers[0].self_attn.qkv_proj
    scales = [tensors[f"model.layers.0.self_attn.{p}_proj.weight_scale"] for p in "qkv"]
    assert len({s.item() for s in scales}) == 3
    expected = torch.cat(
        [s.reshape(1).expand(n) for s, n in zip(scales, qkv.output_partition_sizes)]
    )
    assert torch.equal(qkv.weight_scale[0], expected)  # fmt: skip


def test_dummy_weights_with_an_fp8_config(source, tmp_path):
    path = write_fp8_checkpoint(
        source,
        tmp_path / "d",
        compressed_tensors_config("channel", ["lm_head"]),
        strategy="channel",
    )
    (path / "model.safetensors").unlink()
    model, mc = load_model(path, dtype="float32", load_format="dummy")
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == FP8_DTYPE
    assert torch.isfinite(teacher_forced(model, mc, PROMPT)).all()


def test_bf16_tensor_where_the_config_declares_fp8_is_refused(source, tmp_path):
    path = tmp_path / "lie"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = fp8_method_config([])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"_proj.weight.: .*must be float8_e4m3fn; got torch.float32"
    ):
        load_model(path, dtype="float32")


CT = compressed_tensors_config("channel", ["lm_head"])
REFUSED = [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, r"weight_block_size=\[128, 128\]"),
    ({"quant_method": "awq", "bits": 4}, "quant_method='awq' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme='weird'"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt='e5m2'"),
    ({**CT, "format": "pack-quantized"}, "format='pack-quantized'"),
    ({**CT, "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
    (
        {**CT, "config_groups": {"g": {**CT["config_groups"]["group_0"],
                                       "weights": {**CT["config_groups"]["group_0"]["weights"],
                                                   "type": "int"}}}},
        r"config_groups.g.weights.type='int' is not supported; allowed: 'float'",
    ),
    (
        {**CT, "config_groups": {"g": {**CT["config_groups"]["group_0"],
                                       "weights": {**CT["config_groups"]["group_0"]["weights"],
                                                   "strategy": "block"}}}},
        r"weights.strategy='block'",
    ),
    (
        {**CT, "config_groups": {"g": {**CT["config_groups"]["group_0"],
                                       "weights": {**CT["config_groups"]["group_0"]["weights"],
                                                   "group_size": 128}}}},
        r"weights.group_size=128",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("declared", "pattern"), REFUSED, ids=lambda x: str(x)[:40])
def test_unsupported_quantization_configs_are_refused_naming_the_field(declared, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        fp8_config_for({"quantization_config": declared}, None)
    assert info.value.field == "quantization"


def test_the_config_error_names_the_file(source, tmp_path):
    path = tmp_path / "awq"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: quantization_config\.quant_method='awq'"):
        load_model(path)


def test_setting_values():
    assert fp8_config_for({}, None) is None
    assert fp8_config_for({}, "gguf") is None
    assert fp8_config_for({}, "fp8") == Fp8Config(serialized=False)
    with pytest.raises(ConfigError, match="'int8'"):
        fp8_config_for({}, "int8")
    naive = fp8_config_for({"quantization_config": {**CT, "format": "naive-quantized"}}, None)
    assert naive is not None and naive.serialized and naive.weight_scale == "channel"
    with pytest.raises(ConfigError, match="quantization='gguf' is for GGUF files"):
        fp8_config_for({"quantization_config": fp8_method_config([])}, "gguf")


def test_module_patterns_and_fused_layers():
    config = Fp8Config(serialized=True, ignore=("re:.*\\.1\\.mlp\\..*", "self_attn.o_proj"))
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    assert config.linear_method("model.layers.0.mlp.gate_up_proj", packed) is not None
    assert config.linear_method("model.layers.1.mlp.gate_up_proj", packed) is None
    assert config.linear_method("model.layers.3.self_attn.o_proj", packed) is None
    assert config.linear_method("model.layers.3.self_attn.qkv_proj", packed) is not None
    partial = Fp8Config(serialized=True, ignore=("model.layers.0.self_attn.k_proj",))
    with pytest.raises(ConfigError, match=r"qkv_proj fuses .* all FP8 or none"):
        partial.linear_method("model.layers.0.self_attn.qkv_proj", packed)
    only_mlp = Fp8Config(serialized=True, targets=("re:.*mlp.*",))
    assert only_mlp.linear_method("model.layers.0.self_attn.o_proj", packed) is None
    assert only_mlp.linear_method("model.layers.0.mlp.down_proj", packed) is not None
