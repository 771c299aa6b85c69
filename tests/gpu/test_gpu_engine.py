"""The engine on a CUDA GPU (run on the H100; skipped without one): parity with transformers,
eager vs CUDA-graph decode, and the batching paths."""

from __future__ import annotations

import json

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.cuda

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    tokens = []
    with torch.no_grad():
        out = model(torch.tensor([prompt], device=model.device), use_cache=True)
        for _ in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            nxt = torch.tensor([[tokens[-1]]], device=model.device)
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("gpu-tiny"), "qwen3"))


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_fp32_greedy_matches_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM

    prompts = _prompts([1, 7, 30, 65])
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda()
    ref = [_hf_greedy(hf, p, 24) for p in prompts]
    for eager in (True, False):
        llm = LLM(
            tiny_dir,
            dtype="float32",
            block_size=16,
            num_kv_blocks=128,
            max_num_seqs=8,
            enforce_eager=eager,
        )
        assert llm.engine.device.type == "cuda"
        assert _ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == ref, f"eager={eager}"


def test_graphs_equal_eager_and_batching_paths_agree(tiny_dir):
    prompts = _prompts([3, 17, 40, 9, 33, 21], seed=1)
    base = LLM(tiny_dir, dtype="float32", num_kv_blocks=128, max_num_seqs=8, enforce_eager=True)
    expected = _ids(base.generate(prompts, GREEDY, use_tqdm=False))
    del base
    variants = {
        "graphs": {},
        "chunked": {"max_num_batched_tokens": 16, "enable_prefix_caching": False},
        "prefix": {"enable_prefix_caching": True, "block_size": 4, "num_kv_blocks": 512},
        "preempt": {"num_kv_blocks": 8, "enable_prefix_caching": False},
    }
    for name, kw in variants.items():
        args = {"dtype": "float32", "num_kv_blocks": 128, "max_num_seqs": 8, **kw}
        llm = LLM(tiny_dir, **args)
        if name == "prefix":
            llm.generate(prompts[:2], GREEDY, use_tqdm=False)
        got = _ids(llm.generate(prompts, GREEDY, use_tqdm=False))
        assert got == expected, name
        if name == "preempt":
            assert llm.engine.stats()["num_preemptions"] >= 1


@pytest.fixture(scope="module")
def qwen05_dir(tmp_path_factory):
    """Qwen2.5-0.5B shapes with transformers' random init, saved in bf16."""
    import sys
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from common import SHAPES

    path = tmp_path_factory.mktemp("qwen05")
    (path / "config.json").write_text(json.dumps(SHAPES["qwen2.5-0.5b"]))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(path), dtype=torch.bfloat16
        )
    # transformers' init (std 0.02) gives near-uniform logits over 152k tokens, whose argmax
    # flips with any rounding difference; a wider (tied) embedding separates the top tokens.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return str(path), model


def _kestrel_last_logits(engine, prompt: list[int]) -> torch.Tensor:
    """Kestrel's logits [vocab] at the prompt's last position: one prefill on a scratch cache."""
    from kestrel.ops import AttentionMetadata

    mc, bs, n = engine.model_config, engine.config.block_size, len(prompt)
    num_blocks = -(-n // bs)
    shape = (num_blocks, bs, mc.num_key_value_heads, mc.head_dim)
    kv = [
        (
            torch.zeros(shape, dtype=engine.dtype, device="cuda"),
            torch.zeros(shape, dtype=engine.dtype, device="cuda"),
        )
        for _ in range(mc.num_hidden_layers)
    ]
    i32 = {"dtype": torch.int32}
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device="cuda"),
        query_start_loc=torch.tensor([0, n], device="cuda", **i32),
        seq_lens=torch.tensor([n], device="cuda", **i32),
        block_tables=torch.arange(num_blocks, device="cuda", **i32)[None],
        num_decodes=0,
        num_decode_tokens=0,
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=torch.tensor([0, n], **i32),
        seq_lens_cpu=torch.tensor([n], **i32),
    )
    ids = torch.tensor(prompt, device="cuda")
    with torch.inference_mode():
        hidden = engine.model(ids, torch.arange(n, device="cuda"), kv, meta)
        return engine.model.compute_logits(hidden[-1:])[0].float()


def test_bf16_qwen05_logits_and_greedy(qwen05_dir):
    """bf16 logits vs transformers: the figure the issue names (vs transformers bf16) is printed;
    the assertion holds Kestrel to transformers' own bf16 error against an fp32 run of the same
    weights (two bf16 implementations differ by about the bf16 noise of 24 layers)."""
    import copy

    path, hf = qwen05_dir
    hf32 = copy.deepcopy(hf).float()
    prompts = _prompts(
        [int(n) for n in torch.randint(8, 200, (32,)).tolist()], seed=2, vocab=150000
    )
    llm = LLM(path, dtype="bfloat16", max_model_len=512, max_num_seqs=32)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )
    matches = hf_self = 0  # hf_self: transformers bf16 vs its own fp32 run (the noise floor)
    vs_hf16, vs_fp32, hf16_vs_fp32 = [], [], []
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            ref16 = hf(ids).logits[0, -1].float()
            ref32 = hf32(ids).logits[0, -1].float()
        ours = _kestrel_last_logits(llm.engine, p)
        vs_hf16.append(float((ours - ref16).norm() / ref16.norm()))
        vs_fp32.append(float((ours - ref32).norm() / ref32.norm()))
        hf16_vs_fp32.append(float((ref16 - ref32).norm() / ref32.norm()))
        ref_tokens = _hf_greedy(hf, p, 16)
        matches += ref_tokens == o.outputs[0].token_ids
        hf_self += ref_tokens == _hf_greedy(hf32, p, 16)
    print(
        f"bf16 0.5B logits rel err (max over 32 prompts): Kestrel vs transformers bf16 "
        f"{max(vs_hf16):.2e}; vs fp32 {max(vs_fp32):.2e}; transformers bf16 vs fp32 "
        f"{max(hf16_vs_fp32):.2e}; greedy 16-token prefixes equal {matches}/{len(prompts)} "
        f"(transformers bf16 vs its fp32: {hf_self}/{len(prompts)})"
    )
    assert max(vs_fp32) <= 1.25 * max(hf16_vs_fp32), (vs_fp32, hf16_vs_fp32)
    assert max(vs_hf16) < 5e-2, vs_hf16
    assert matches >= 0.9 * len(prompts), f"{matches}/{len(prompts)} greedy prefixes equal"


MARK = 0.125  # logit_bias value of the request whose sampling the test makes fail


def _fail_marked_batches(monkeypatch):
    from kestrel.sample import Sampler

    real_call = Sampler.__call__

    def call(self, logits, batch):
        values = batch.logit_bias_values
        if values is not None and bool((values == MARK).any()):
            raise ValueError("injected sampling fault")
        return real_call(self, logits, batch)

    monkeypatch.setattr(Sampler, "__call__", call)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampling_fault_fails_one_request_on_gpu(tiny_dir, monkeypatch, dtype):
    """A request whose sampling raises fails alone on the GPU (bf16: CUDA graphs for decode);
    the others finish. fp32 (eager): their tokens equal a run where it is healthy."""
    prompts = _prompts([5, 9, 13, 7], seed=3)
    sampled = SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True)
    params = [GREEDY, sampled, GREEDY]
    llm = LLM(tiny_dir, dtype=dtype, num_kv_blocks=128, max_num_seqs=8)
    healthy = GREEDY.clone(logit_bias={7: 0.25})
    reference = llm.generate(prompts, [*params, healthy], use_tqdm=False)
    _fail_marked_batches(monkeypatch)
    faulty = GREEDY.clone(logit_bias={7: MARK})
    outs = llm.generate(prompts, [*params, faulty], use_tqdm=False)
    assert outs[3].error is not None and "injected sampling fault" in outs[3].error
    assert outs[3].outputs[0].finish_reason == "error"
    for out in outs[:3]:
        assert out.error is None and len(out.outputs[0].token_ids) == 24
    if dtype == "float32":
        assert _ids(outs[:3]) == _ids(reference[:3])
    again = llm.generate(prompts[:3], params, use_tqdm=False)
    assert all(o.error is None and len(o.outputs[0].token_ids) == 24 for o in again)
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == 128 and stats["kv_cache_usage"] == 0.0, stats
