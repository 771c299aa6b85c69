"""Tiny random models shared by the engine tests, and transformers' greedy reference."""

from __future__ import annotations

import functools

import pytest
import torch

from kestrel.testing.tiny_models import make_tiny_model

ARCH_KWARGS = {
    "llama": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "qwen2": {"tie_word_embeddings": True, "max_shard_size": "60KB"},
    "qwen3": {"num_kv_heads": 1},
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    @functools.cache
    def make(arch: str) -> str:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        make_tiny_model(path, arch, **ARCH_KWARGS.get(arch, {}))
        return str(path)

    return make


@pytest.fixture(scope="session")
def hf_greedy(tiny_model_dir):
    """hf_greedy(arch, prompt_ids, n) -> transformers' n greedy tokens (EOS ignored)."""
    from transformers import AutoModelForCausalLM

    @functools.cache
    def model(arch: str):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)

    def generate(arch: str, prompt: list[int], n: int) -> list[int]:
        # A plain greedy loop over transformers' forward with its KV cache: generate() would
        # mask EOS (min_new_tokens) or stop at it, while the engine runs with ignore_eos.
        m = model(arch)
        tokens: list[int] = []
        with torch.no_grad():
            out = m(torch.tensor([prompt]), use_cache=True)
            for _ in range(n):
                tokens.append(int(out.logits[0, -1].argmax()))
                out = m(
                    torch.tensor([[tokens[-1]]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        return tokens

    generate.model = model
    return generate
