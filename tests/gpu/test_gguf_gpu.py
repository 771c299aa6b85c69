"""GGUF linears kept quantized on the GPU (the GEMV and dequantize kernels inside a model):
logits against the same file dequantized, and the engine's greedy tokens with CUDA graphs
equal to eager."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.layers.gguf_linear import GGUFLinearMethod
from kestrel.loader.gguf_loader import load_gguf_model
from kestrel.loader.gguf_quantized import KEEP_QUANTIZED_ENV
from kestrel.ops import _dispatch
from kestrel.testing.tiny_models import make_tiny_model
from tests.gguf.fixtures import MIXED_TINY, mixed_qtype_for, prefill_logits, write_gguf_from_hf
from tests.kernels.helpers import kernel_spy, set_kernel_env

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _allow_unverified(monkeypatch):
    """The GGUF kernels are off by default until a GPU run verifies them
    (_dispatch.UNVERIFIED_OPS): these tests are that run."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, "1")


PROMPT = [5, 77, 300, 12, 9, 401, 250, 3, 64, 128, 17]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def mixed_gguf(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    hf_dir = make_tiny_model(root / "hf", request.param, **MIXED_TINY)
    return write_gguf_from_hf(hf_dir, root / "m.gguf", request.param, qtype_for=mixed_qtype_for)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kept_model_is_as_accurate_as_the_dequantized_one(mixed_gguf, dtype, monkeypatch):
    spy = next(kernel_spy(monkeypatch))
    kept, config = load_gguf_model(mixed_gguf, dtype, "cuda", keep_quantized_blocks=True)
    plain, _ = load_gguf_model(mixed_gguf, dtype, "cuda", keep_quantized_blocks=False)
    oracle, _ = load_gguf_model(mixed_gguf, torch.float32, "cpu", keep_quantized_blocks=False)
    qkv = kept.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, GGUFLinearMethod) and qkv.weight.is_cuda
    for ids in (PROMPT[:5], PROMPT):  # 5 rows: the GEMV; 11 rows: dequantize + matmul
        ref = prefill_logits(oracle, config, ids)
        err_kept = _rel(prefill_logits(kept, config, ids), ref)
        err_plain = _rel(prefill_logits(plain, config, ids), ref)
        assert err_kept <= 1.5 * err_plain + 1e-3, (len(ids), err_kept, err_plain)
    assert spy.calls["gguf_gemv"] > 0 and spy.calls["gguf_dequantize"] > 0


def test_engine_graphs_match_eager_with_kept_blocks(mixed_gguf, monkeypatch):
    monkeypatch.setenv(KEEP_QUANTIZED_ENV, "auto")  # the default: kept on CUDA
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:3], PROMPT[2:9], [7] * 20]
    runs = []
    for eager in (True, False):
        llm = LLM(str(mixed_gguf), dtype="bfloat16", device="cuda", enforce_eager=eager,
                  max_num_seqs=8, max_model_len=256)  # fmt: skip
        qkv = llm.engine.model.model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv.quant_method, GGUFLinearMethod)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        torch.cuda.empty_cache()
    assert runs[0] == runs[1]
    assert all(len(ids) == 24 for ids in runs[0])
