"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) in Kestrel vs transformers loading the
same file with `gguf_file=` (both dequantize to float32): logits, greedy text, chat."""

from __future__ import annotations

import pytest
import torch

from kestrel import SamplingParams
from tests.gguf.fixtures import prefill_logits

PROMPTS = [
    "The kestrel is a bird of prey that",
    "def fibonacci(n):\n    ",
    "Paris, London and Berlin are",
    "1, 2, 3, 5, 8, 13,",
]
NEW_TOKENS = 32
REL_TOL = 1e-3


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    # transformers' forward with its KV cache; generate() would stop at EOS.
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens


def test_default_model_config(default_llm):
    mc = default_llm.engine.model_config
    assert (mc.architecture, mc.num_hidden_layers, mc.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim) == (9, 3, 64)
    assert (mc.vocab_size, mc.rope_theta, mc.tie_word_embeddings) == (49152, 100000.0, True)
    assert default_llm.engine.eos_token_ids == (2,)  # <|im_end|>


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_logits_match_transformers(default_llm, hf_smollm_model, hf_smollm_tokenizer, prompt):
    ids = hf_smollm_tokenizer(prompt).input_ids
    engine = default_llm.engine
    ours = prefill_logits(engine.model, engine.model_config, ids)  # [len, vocab]
    with torch.no_grad():
        ref = hf_smollm_model(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL, rel
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_outputs_match_transformers(default_llm, hf_smollm_model, hf_smollm_tokenizer):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = default_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = hf_smollm_tokenizer(prompt).input_ids
        assert output.prompt_token_ids == ids
        expected = _hf_greedy(hf_smollm_model, ids, NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == expected, prompt
        assert output.outputs[0].text == hf_smollm_tokenizer.decode(expected)


def test_chat_answers_paris(default_llm, hf_smollm_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = default_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    assert rendered.endswith("<|im_start|>assistant\n")
    params = SamplingParams(temperature=0, max_tokens=32)
    output = default_llm.chat(messages, params, use_tqdm=False)[0]
    assert output.prompt_token_ids == hf_smollm_tokenizer(expected).input_ids
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, the GGUF's EOS
