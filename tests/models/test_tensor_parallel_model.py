"""Whole decoders sharded over tp = 2 and 4 thread-simulated ranks (CPU, fp32) vs tp = 1.

Every rank builds the model with its group, loads the same full checkpoint through the weight
loaders and runs the same paged steps over its own KV cache (its KV heads only); the
collectives exchange tensors between the rank threads. Each rank's logits must match the
unsharded model's (only the summation order differs).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kestrel.layers import TensorParallelGroup
from kestrel.loader import find_safetensors_files, iter_safetensors_weights, read_model_config
from kestrel.models import get_model_class
from kestrel.testing.tiny_models import make_tiny_model
from tests.layers.tp_sim import run_ranks
from tests.models.paged_batch import PagedRunner

pytest.importorskip("transformers")

PROMPT_LENS = (7, 19, 12)
DECODE_STEPS = 2
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norm, head_dim != hidden / heads
    # 510 ids: 128 rows per rank at tp 4, the last rank with 2 padding rows.
    "llama_tied": ("llama", {"tie_word_embeddings": True, "vocab_size": 510}),
    "mistral": ("mistral", {"num_kv_heads": 1}),  # one KV head, replicated on every rank
}


def run_model(path: Path, group: TensorParallelGroup) -> list[torch.Tensor]:
    """Prefill all prompts but DECODE_STEPS tokens, then decode; every step's logits."""
    torch.set_num_threads(1)
    config = read_model_config(path)
    model = get_model_class(config.architecture)(config, torch.float32, "cpu", tp_group=group)
    model.load_weights(iter_safetensors_weights(find_safetensors_files(path)))
    model.eval()
    attn = model.model.layers[0].self_attn
    assert attn.num_heads == config.num_attention_heads // group.size
    # This rank's KV cache geometry: its KV heads only.
    shape = SimpleNamespace(
        num_key_value_heads=attn.num_kv_heads,
        head_dim=config.head_dim,
        num_hidden_layers=config.num_hidden_layers,
    )
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENS
    ]
    runner = PagedRunner(model, shape, prompts, block_size=4)
    steps = [runner.step([(i, len(p) - DECODE_STEPS) for i, p in enumerate(prompts)])]
    for _ in range(DECODE_STEPS):
        steps.append(runner.step([(i, 1) for i in range(len(prompts))]))
    return [torch.cat([step[i] for i in range(len(prompts))]) for step in steps]


@pytest.fixture(scope="module", params=sorted(SPECS))
def checkpoint(request, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    arch, kwargs = SPECS[request.param]
    path = make_tiny_model(
        tmp_path_factory.mktemp(request.param), arch, with_tokenizer=False, **kwargs
    )
    return path, run_ranks(1, lambda group: run_model(path, group))[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_model_matches_unsharded(checkpoint, tp: int) -> None:
    path, expected = checkpoint
    for rank, steps in enumerate(run_ranks(tp, lambda group: run_model(path, group))):
        for step, (actual, reference) in enumerate(zip(steps, expected)):
            assert actual.shape == reference.shape
            torch.testing.assert_close(
                actual, reference, rtol=1e-4, atol=1e-4, msg=f"tp {tp} rank {rank} step {step}"
            )
            assert torch.equal(actual.argmax(-1), reference.argmax(-1))
