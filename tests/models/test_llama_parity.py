"""Kestrel's Llama-family decoder vs transformers on tiny random models (CPU, fp32)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from kestrel.loader import load_model
from kestrel.testing.tiny_models import make_tiny_model
from tests.models.paged_batch import PagedRunner

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (7, 19, 33)
REL_TOL = 1e-4


@dataclass(frozen=True)
class Spec:
    arch: str
    block_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SPECS = {
    "llama": Spec("llama", 4),
    "llama3_tied": Spec(
        "llama",
        16,
        {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True},
    ),
    "qwen2_sharded": Spec("qwen2", 4, {"max_shard_size": "60KB"}),
    "qwen3": Spec("qwen3", 16, {"head_dim": 32}),  # head_dim != hidden_size / num_heads
    "mistral": Spec("mistral", 4, {"num_kv_heads": 1}),
}


@dataclass
class Pair:
    spec: Spec
    model: torch.nn.Module
    config: Any
    prompts: list[list[int]]
    reference: list[torch.Tensor]  # per prompt: transformers logits [len, vocab]


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, tmp_path_factory) -> Pair:
    torch.set_num_threads(1)
    spec = SPECS[request.param]
    path = make_tiny_model(
        tmp_path_factory.mktemp(request.param), spec.arch, with_tokenizer=False, **spec.kwargs
    )
    model, config = load_model(path, dtype=torch.float32, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENS
    ]
    with torch.inference_mode():
        reference = [hf(torch.tensor([p])).logits[0].float() for p in prompts]
    return Pair(spec, model, config, prompts, reference)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    rel = (actual - expected).norm() / expected.norm()
    assert rel < REL_TOL, f"{what}: relative error {rel:.2e}"
    assert torch.equal(actual.argmax(-1), expected.argmax(-1)), f"{what}: greedy tokens differ"


def test_batched_prefill_matches_transformers(pair: Pair) -> None:
    runner = PagedRunner(pair.model, pair.config, pair.prompts, pair.spec.block_size)
    logits = runner.step([(i, len(p)) for i, p in enumerate(pair.prompts)])
    for i, expected in enumerate(pair.reference):
        assert_close(logits[i], expected, f"prompt {i} prefill")


def test_batched_decode_matches_transformers(pair: Pair) -> None:
    num_decode_steps = 4
    runner = PagedRunner(pair.model, pair.config, pair.prompts, pair.spec.block_size, seed=2)
    prefill = runner.step([(i, len(p) - num_decode_steps) for i, p in enumerate(pair.prompts)])
    for i, expected in enumerate(pair.reference):
        assert_close(prefill[i], expected[:-num_decode_steps], f"prompt {i} prefill")
    for step in range(num_decode_steps):
        logits = runner.step([(i, 1) for i in range(len(pair.prompts))])
        for i, expected in enumerate(pair.reference):
            position = len(pair.prompts[i]) - num_decode_steps + step
            assert_close(logits[i], expected[position : position + 1], f"prompt {i} pos {position}")


def test_mixed_decode_and_chunked_prefill_matches_transformers(pair: Pair) -> None:
    """Decodes first, then prefill chunks over a cached prefix, in the same steps."""
    runner = PagedRunner(pair.model, pair.config, pair.prompts, pair.spec.block_size, seed=3)
    short, middle, long = (len(p) for p in pair.prompts)
    schedules = [
        [(0, short - 2), (2, 10)],  # two first chunks
        [(0, 1), (2, 9), (1, middle - 1)],  # a decode, a second chunk, a whole prompt but one
        [(0, 1), (1, 1), (2, long - 19)],  # two decodes and the last chunk
    ]
    fed = [0, 0, 0]
    for step, schedule in enumerate(schedules):
        logits = runner.step(schedule)
        for i, count in schedule:
            expected = pair.reference[i][fed[i] : fed[i] + count]
            assert_close(logits[i], expected, f"step {step} seq {i}")
            fed[i] += count
    assert fed == [short, middle, long]
