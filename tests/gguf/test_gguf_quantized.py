"""GGUF files whose linears stay quantized (raw blocks + GGUFLinearMethod) against the same
file dequantized at load, on CPU (the torch reference path): the loader's choice per layer, the
logits, and an engine's greedy tokens."""

from __future__ import annotations

import gguf
import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.layers.gguf_linear import GGUFLinearMethod
from kestrel.layers.linear import UnquantizedLinearMethod
from kestrel.loader.gguf_loader import load_gguf_model
from kestrel.loader.gguf_quantized import KEEP_QUANTIZED_ENV, keep_quantized
from kestrel.testing.tiny_models import make_tiny_model
from tests.gguf.fixtures import MIXED_TINY, mixed_qtype_for, prefill_logits, write_gguf_from_hf

Q = gguf.GGMLQuantizationType
PROMPT = [5, 77, 300, 12, 9, 401, 250, 3, 64, 128, 17]


@pytest.fixture(params=["llama", "qwen2"])
def mixed_gguf(request, tmp_path):
    hf_dir = make_tiny_model(tmp_path / "hf", request.param, **MIXED_TINY)
    path = tmp_path / "m.gguf"
    return write_gguf_from_hf(hf_dir, path, request.param, qtype_for=mixed_qtype_for)


def _method(model, path: str):
    return model.get_submodule(path).quant_method


def test_kept_layers_and_logits_match_the_dequantized_file(mixed_gguf):
    kept, config = load_gguf_model(mixed_gguf, "float32", keep_quantized_blocks=True)
    plain, _ = load_gguf_model(mixed_gguf, "float32", keep_quantized_blocks=False)
    qkv0 = _method(kept, "model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv0, GGUFLinearMethod) and qkv0.part_types == (Q.Q4_K, Q.Q4_K, Q.Q8_0)
    assert _method(kept, "model.layers.0.mlp.down_proj").part_types == (Q.Q8_0,)
    assert _method(kept, "model.layers.1.mlp.gate_up_proj").part_types == (Q.Q4_K, Q.Q4_K)
    assert isinstance(_method(kept, "model.layers.1.self_attn.qkv_proj"), UnquantizedLinearMethod)
    assert all(
        isinstance(m.quant_method, UnquantizedLinearMethod)
        for m in plain.modules()
        if hasattr(m, "quant_method")
    )
    assert kept.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.uint8
    nbytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (kept, plain)]
    assert nbytes[0] < nbytes[1] * 0.6
    ours = prefill_logits(kept, config, PROMPT)
    ref = prefill_logits(plain, config, PROMPT)
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
    assert ref.std() > 0.1  # a model that says something


def test_engine_greedy_tokens_match_the_dequantized_file(mixed_gguf, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = []
    for keep in ("1", "0"):
        monkeypatch.setenv(KEEP_QUANTIZED_ENV, keep)
        llm = LLM(str(mixed_gguf), dtype="float32", device="cpu", num_kv_blocks=64, block_size=4)
        qkv = llm.engine.model.model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv.quant_method, GGUFLinearMethod) == (keep == "1")
        outputs.append(llm.generate([PROMPT, PROMPT[:5]], params, use_tqdm=False))
    kept, plain = ([list(o.outputs[0].token_ids) for o in out] for out in outputs)
    assert kept == plain
    assert len(set(kept[0])) > 1


def test_keep_quantized_choice(monkeypatch):
    from kestrel.loader import gguf_quantized

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(gguf_quantized, "gguf_kernels_usable", lambda: True)
    assert not keep_quantized(cpu, {}) and keep_quantized(cuda, {})
    monkeypatch.setattr(gguf_quantized, "gguf_kernels_usable", lambda: False)  # e.g. unverified
    assert not keep_quantized(cuda, {})
    assert keep_quantized(cpu, {KEEP_QUANTIZED_ENV: "1"})
    assert not keep_quantized(cuda, {KEEP_QUANTIZED_ENV: "0"})
    with pytest.raises(ValueError, match="KESTREL_GGUF_QUANTIZED='yes'; expected one of"):
        keep_quantized(cpu, {KEEP_QUANTIZED_ENV: "yes"})
