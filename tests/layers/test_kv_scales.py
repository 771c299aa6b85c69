"""KV-cache scales from a checkpoint (kestrel.layers.kv_scales): llm-compressor's
`self_attn.k_scale` / `v_scale`, AutoFP8's `k_proj.output_scale` / `v_proj.output_scale`, per-head
scales (their maximum), attention-input scales read past, bad values refused; and an engine
with an FP8 cache uses them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel import LLM, SamplingParams
from kestrel.layers.quant_config import fp8_config_for
from kestrel.loader import load_model
from kestrel.testing.tiny_models import make_tiny_model
from tests.models.fp8_checkpoints import compressed_tensors_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def _with_tensors(source: Path, dest: Path, extra: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(source, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    save_file({**tensors, **extra}, str(dest / "model.safetensors"))
    return dest


def _scales(model) -> list[tuple[float, float]]:
    return [
        (layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) for layer in model.model.layers
    ]


def test_without_scales_they_are_one(tiny_dir):
    model, _ = load_model(tiny_dir, "float32")
    assert _scales(model) == [(1.0, 1.0), (1.0, 1.0)]


def test_llm_compressor_and_autofp8_names(tiny_dir, tmp_path):
    extra = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.25),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.5]),
        "model.layers.1.self_attn.k_proj.output_scale": torch.tensor(2.0, dtype=torch.bfloat16),
        "model.layers.1.self_attn.v_proj.output_scale": torch.tensor([0.125, 4.0]),  # per head
        "model.layers.1.self_attn.q_scale": torch.tensor(3.0),  # read past
    }
    model, _ = load_model(_with_tensors(tiny_dir, tmp_path / "m", extra), "float32")
    assert _scales(model) == [(0.25, 0.5), (2.0, 4.0)]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scales_are_refused_naming_the_tensor(tiny_dir, tmp_path, bad):
    extra = {"model.layers.1.self_attn.v_scale": torch.tensor(bad)}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_scale"):
        load_model(_with_tensors(tiny_dir, tmp_path / "m", extra), "float32")


def test_a_kv_cache_scheme_is_accepted():
    kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    hf = {
        "quantization_config": {
            **compressed_tensors_config("channel", []),
            "kv_cache_scheme": kv_scheme,
        }
    }
    assert fp8_config_for(hf, None) is not None


def test_the_engine_reads_the_cache_with_the_checkpoint_scales(tiny_dir, tmp_path):
    """Small scales keep small K/V out of e4m3's subnormals: the FP8 engine's codes are those
    of k / k_scale, and generation runs."""
    extra = {}
    for i in range(2):
        extra[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.01)
        extra[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.002)
    path = _with_tensors(tiny_dir, tmp_path / "m", extra)
    llm = LLM(str(path), device="cpu", num_kv_blocks=16, block_size=4, kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    key_cache, value_cache = llm.engine.runner.kv_caches[0]
    k_codes = key_cache.float().abs()
    # Unit-scale codes of this model's K would stay below ~2; divided by 0.01 they do not.
    assert float(k_codes.max()) > 20 and bool(torch.isfinite(k_codes).all())
    assert float(value_cache.float().abs().max()) > 20
