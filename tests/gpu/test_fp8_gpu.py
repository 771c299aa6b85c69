"""FP8 on a CUDA GPU of compute capability 8.9+ (the H200; skipped without a GPU):
torch._scaled_mm against the float32 matmul of the dequantized operands at decode and prefill
shapes, the quantization on the GPU against the CPU's, the FP8 layer against BF16, and whole
engines with quantization="fp8" against BF16 ones (tiny random model, real SmolLM2): logits
relative error and greedy agreement over 32 tokens, eager and CUDA-graph decode alike."""

from __future__ import annotations

import gc

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.layers import ReplicatedLinear, process_weights_after_loading
from kestrel.layers.fp8 import (
    FP8_DTYPE,
    Fp8LinearMethod,
    fp8_capable,
    fp8_matmul,
    fp8_matmul_reference,
    quantize_rows,
)
from kestrel.testing.tiny_models import make_tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not fp8_capable(torch.device("cuda")),
        reason="needs a GPU of compute capability 8.9+",
    ),
]

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# The CPU tests' bounds (tests/models/test_fp8_model.py), bf16 instead of fp32 around them.
TINY_REL, TINY_AGREE, TINY_GAP = 0.25, 0.6, 2.5
SMOLLM_REL, SMOLLM_AGREE, SMOLLM_GAP = 0.15, 0.7, 1.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# Decode (1, 3 rows) and prefill (17, 257 rows) at SmolLM2 and Qwen2.5-7B projection shapes.
SHAPES = [(1, 576, 960), (3, 576, 3072), (17, 1536, 576), (257, 3584, 4608), (1, 18944, 3584)]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("t", "k", "n"), SHAPES)
def test_scaled_mm_matches_dequantized_float32_matmul(t, k, n, out_dtype):
    g = torch.Generator(device="cuda").manual_seed(t * 7 + k)
    x = torch.randn(t, k, device="cuda", generator=g, dtype=torch.bfloat16) * 4
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    x_q, x_scale = quantize_rows(x)
    w_q, w_scale = quantize_rows(w)
    out = fp8_matmul(x_q, x_scale, w_q, w_scale.reshape(1, n), out_dtype)
    ref = fp8_matmul_reference(x_q, x_scale, w_q, w_scale.reshape(1, n), torch.float32)
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-2  # bf16 rounding of the result; accumulation in float32


def test_quantization_on_the_gpu_matches_the_cpu():
    x = torch.randn(33, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q_cpu, s_cpu = quantize_rows(x)
    q_gpu, s_gpu = quantize_rows(x.cuda())
    assert torch.allclose(s_gpu.cpu(), s_cpu, rtol=1e-6, atol=0)
    _assert_same_quantization(q_gpu.cpu(), q_cpu)


def _assert_same_quantization(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two e4m3 quantizations of one matrix: codes equal except values on a rounding boundary
    (the CPU and GPU casts from float32 to e4m3 disagree next to a rounding boundary), which land on the adjacent
    code (same sign, magnitude one step away: the byte differs by 1)."""
    ca, cb = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    differ = ca != cb
    assert differ.float().mean().item() < 5e-3
    assert ((ca - cb).abs()[differ] == 1).all()


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_layer_close_to_bf16_and_exactly_its_dequantized_matmul(bias):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(960, 576, generator=g) * 0.05, torch.randn(960, generator=g)
    x = torch.randn(9, 576, generator=g).to("cuda", torch.bfloat16)
    layer = ReplicatedLinear(
        576, 960, bias=bias, dtype=torch.bfloat16, device="cuda", quant_method=Fp8LinearMethod()
    )
    layer.weight.data.copy_(w)
    if bias:
        layer.bias.data.copy_(b)
    process_weights_after_loading(layer)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.device.type == "cuda"
    # The weight quantized on the GPU is the CPU's quantization of the same bf16 weight.
    q_cpu, s_cpu = quantize_rows(w.to(torch.bfloat16))
    _assert_same_quantization(layer.weight.cpu(), q_cpu)
    assert torch.allclose(layer.weight_scale.cpu().reshape(-1), s_cpu.reshape(-1), rtol=1e-6)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    x_q, x_scale = quantize_rows(x)
    ref = fp8_matmul_reference(x_q, x_scale, layer.weight, layer.weight_scale, torch.float32)
    ref = ref + (b.cuda() if bias else 0)
    assert _rel(out, ref) < 1e-2  # bf16 output rounding
    plain = x.float().cpu() @ w.t() + (b if bias else 0)
    assert _rel(out.cpu(), plain) < 0.06


def test_sizes_the_gpu_kernels_cannot_take_are_refused():
    with pytest.raises(ValueError, match=r"proj: FP8 needs input features .* multiple of 16.*40"):
        ReplicatedLinear(40, 64, bias=False, device="cuda", quant_method=Fp8LinearMethod(),
                         prefix="proj")  # fmt: skip


def _prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """The engine's model's logits [len(ids), vocab] (float32) of one prefill on a scratch
    cache."""
    from kestrel.ops import AttentionMetadata

    mc, bs, n = engine.model_config, engine.config.block_size, len(ids)
    device = engine.device
    num_blocks = -(-n // bs)
    shape = (num_blocks, bs, mc.num_key_value_heads, mc.head_dim)
    kv = [
        tuple(torch.zeros(shape, dtype=engine.dtype, device=device) for _ in range(2))
        for _ in range(mc.num_hidden_layers)
    ]
    i32 = {"dtype": torch.int32}
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        query_start_loc=torch.tensor([0, n], device=device, **i32),
        seq_lens=torch.tensor([n], device=device, **i32),
        block_tables=torch.arange(num_blocks, device=device, **i32)[None],
        num_decodes=0,
        num_decode_tokens=0,
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=torch.tensor([0, n], **i32),
        seq_lens_cpu=torch.tensor([n], **i32),
    )
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(ids, device=device), torch.arange(n, device=device),
                              kv, meta)  # fmt: skip
        return engine.model.compute_logits(hidden).float()


def _weight_bytes(llm) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())


def _compare_engines(model: str, prompt: list[int], rel_tol, agree_min, gap_max, **kwargs):
    """BF16 engine's greedy continuation; the FP8 engine (eager and with decode graphs) scored
    along it. Returns nothing; asserts the bounds."""
    common = {"dtype": "bfloat16", "num_kv_blocks": 64, "max_num_seqs": 4, **kwargs}
    bf16 = LLM(model, **common)
    tokens = bf16.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    ref = _prefill_logits(bf16.engine, prompt + tokens[:-1])[len(prompt) - 1 :]
    bf16_bytes = _weight_bytes(bf16)
    del bf16
    gc.collect()
    runs = {}
    for eager in (True, False):
        fp8 = LLM(model, quantization="fp8", enforce_eager=eager, **common)
        qkv = fp8.engine.model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == FP8_DTYPE
        assert _weight_bytes(fp8) < 0.75 * bf16_bytes
        runs[eager] = fp8.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        forced = _prefill_logits(fp8.engine, prompt + tokens[:-1])[len(prompt) - 1 :]
        del fp8
        gc.collect()
    assert runs[True] == runs[False], "FP8 decode differs between eager and CUDA graphs"
    rel = _rel(forced, ref)
    same = forced.argmax(-1).cpu() == torch.tensor(tokens)
    top2 = ref.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).cpu()[~same]
    print(f"{model}: FP8 vs BF16 rel {rel:.4f}, agreement {same.float().mean():.3f}, "
          f"free-running greedy equal for {_common_prefix(runs[False], tokens)} tokens")  # fmt: skip
    assert rel < rel_tol
    assert same.float().mean().item() >= agree_min
    assert gaps.numel() == 0 or gaps.max().item() < gap_max


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_engine_fp8_tiny_model_against_bf16(tmp_path):
    path = str(make_tiny_model(tmp_path / "tiny", "qwen3", head_dim=32))
    prompt = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    _compare_engines(path, prompt, TINY_REL, TINY_AGREE, TINY_GAP, block_size=16)


def test_engine_fp8_smollm_against_bf16():
    from kestrel.default_model import default_model_path
    from kestrel.loader.gguf_loader import GGUFFile
    from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer

    path = default_model_path()
    prompt = load_gguf_tokenizer(GGUFFile(path)).encode("The kestrel is a bird of prey that")
    _compare_engines(str(path), prompt, SMOLLM_REL, SMOLLM_AGREE, SMOLLM_GAP)


def test_engine_fp8_dummy_7b_shape_runs_with_graphs(tmp_path):
    """The benchmark's configuration: a Qwen2.5-7B-shaped dummy model quantized at load."""
    import importlib.util
    import json
    from pathlib import Path

    common = Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("kestrel_benchmarks_common", common)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "config.json").write_text(json.dumps(module.SHAPES["qwen2.5-7b"]))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", quantization="fp8",
              max_model_len=512, max_num_seqs=4)  # fmt: skip
    out = llm.generate([[100, 200, 300]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == NEW_TOKENS
    assert _weight_bytes(llm) < 10e9  # ~7.6 GB (FP8 decoder + BF16 embeddings), not 15 GB
