"""Tiny random models written as GGUF files (llama.cpp layout) and loaded by Kestrel, against
transformers running the original Hugging Face weights; GGUF file errors."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.loader import load_model
from kestrel.loader.gguf_dequant import UnsupportedTensorTypeError
from kestrel.loader.gguf_loader import GGUFFile, llama3_scaling_from_factors
from kestrel.ops import compute_cos_sin_cache
from kestrel.testing.tiny_models import make_tiny_model
from tests.gguf.fixtures import prefill_logits, write_gguf, write_gguf_from_hf

transformers = pytest.importorskip("transformers")

PROMPT = [5, 77, 300, 12, 9, 401, 250, 3, 64, 128, 17]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama": ("llama", {}),
    "llama_tied_gqa1": ("llama", {"tie_word_embeddings": True, "num_kv_heads": 1}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}


def _hf_logits(hf_dir, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_f32_gguf_matches_hf_weights(tmp_path, case):
    arch, kwargs = CASES[case]
    hf_dir = make_tiny_model(tmp_path / "hf", arch, **kwargs)
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", arch)
    model, config = load_model(path, "float32")
    assert (
        config.architecture == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    )
    assert config.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
    ours = prefill_logits(model, config, PROMPT)
    ref = _hf_logits(hf_dir, PROMPT)
    assert _rel(ours, ref) < 1e-5


def test_llama_rows_left_unpermuted_give_other_logits(tmp_path):
    # The Q/K row order matters: a llama file written without llama.cpp's permutation loads,
    # but its logits are far from the reference (so the parity above checks the unpermute).
    hf_dir = make_tiny_model(tmp_path / "hf", "llama")
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", permute=False)
    model, config = load_model(path, "float32")
    assert _rel(prefill_logits(model, config, PROMPT), _hf_logits(hf_dir, PROMPT)) > 1e-2


def test_q8_0_gguf_matches_transformers_on_same_file(tmp_path):
    hf_dir = make_tiny_model(tmp_path / "hf", "llama")
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", qtype=q8)
    model, config = load_model(path, "float32")
    ours = prefill_logits(model, config, PROMPT)
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    )
    with torch.no_grad():
        ref = hf_gguf(torch.tensor([PROMPT])).logits[0]
    assert _rel(ours, ref) < 1e-5
    assert 1e-4 < _rel(ours, _hf_logits(hf_dir, PROMPT)) < 5e-2  # Q8_0 rounding, nothing more


def _llama3_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """llama.cpp's rope_freqs: base inv_freq / scaled inv_freq, from transformers' llama3 rope."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters={**scaling, "rope_theta": theta},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / scaled.double()).numpy()


@pytest.mark.parametrize("low_freq_factor", [1.0, 2.0])
def test_llama3_scaling_recovered_from_rope_freqs(low_freq_factor):
    scaling = {**LLAMA3, "low_freq_factor": low_freq_factor}
    factors = _llama3_factors(64, 10000.0, scaling)
    recovered = llama3_scaling_from_factors(factors, 64, 10000.0)
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == pytest.approx(8.0)
    want = compute_cos_sin_cache(64, 512, 10000.0, scaling)
    got = compute_cos_sin_cache(64, 512, 10000.0, recovered)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert llama3_scaling_from_factors(np.ones(32), 64, 10000.0) is None
    with pytest.raises(ValueError, match="does not follow llama3"):
        llama3_scaling_from_factors(factors[::-1].copy(), 64, 10000.0)


def test_llama3_gguf_with_rope_freqs_matches_hf(tmp_path):
    kwargs = {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 2, "rope_scaling": LLAMA3}
    hf_dir = make_tiny_model(tmp_path / "hf", "llama", **kwargs)
    factors = _llama3_factors(32, 10000.0, LLAMA3)
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", rope_freqs=factors)
    model, config = load_model(path, "float32")
    assert config.rope_scaling["rope_type"] == "llama3"
    ids = (PROMPT * 12)[:120]  # past original_max_position_embeddings=64
    assert _rel(prefill_logits(model, config, ids), _hf_logits(hf_dir, ids)) < 1e-5


def test_engine_on_tiny_gguf_greedy_matches_hf(tmp_path):
    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2", tie_word_embeddings=True)
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "qwen2")
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=64, block_size=4)
    assert llm.engine.eos_token_ids == (llm.tokenizer.token_to_id("<|im_end|>"),)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(PROMPT) :].tolist()
    assert list(out.outputs[0].token_ids) == ref


# ---- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        LLM(str(missing))


def test_truncated_file(tmp_path):
    hf_dir = make_tiny_model(tmp_path / "hf", "llama", with_tokenizer=False)
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", with_tokenizer=False)
    data = path.read_bytes()
    for keep in (len(data) - 100, len(data) // 2, 200):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match="truncated"):
            load_model(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        GGUFFile(bad)


def test_unsupported_tensor_type_in_model(tmp_path):
    hf_dir = make_tiny_model(tmp_path / "hf", "llama", with_tokenizer=False)
    good = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "llama", with_tokenizer=False)
    reader = GGUFFile(good).reader
    metadata = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    tensors = {}
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight":  # [128, 64] as I32 (an integer type)
            tensors[t.name] = (
                np.zeros((128, 64 * 4), dtype=np.uint8),
                gguf.GGMLQuantizationType.I32,
            )
        else:
            tensors[t.name] = np.array(t.data)
    path = write_gguf(tmp_path / "i32.gguf", "llama", metadata, tensors)
    with pytest.raises(UnsupportedTensorTypeError, match=r"'blk.1.ffn_up.weight' is stored as I32"):
        load_model(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "gpt2", {"gpt2.block_count": 1}, {})
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_model(path)
    shutil.rmtree(tmp_path)
