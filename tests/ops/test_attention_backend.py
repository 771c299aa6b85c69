"""PagedAttentionBackend on the CPU: a step's metadata is validated and planned once, every layer
follows the plan, and planned attention equals the hand-planned call."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.ops import paged_attention
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.ops.attention_metadata import AttentionMetadata
from kestrel.testing.tiny_models import make_tiny_model
from tests.ops.test_ref_attention import _make_batch


def _backend(block_size: int = 4) -> PagedAttentionBackend:
    return PagedAttentionBackend(
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=8,
        block_size=block_size,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def _batch(block_size: int = 4):
    lens = [(1, 9), (1, 3), (5, 5), (3, 11)]  # (query_len, seq_len): two decodes, two prefills
    return _make_batch(lens, 2, block_size, 4, 2, 8, torch.float32, seed=0)


def test_planned_attention_equals_the_hand_planned_call():
    batch = _batch()
    planned = _backend().plan(batch.metadata)
    assert planned.plan is not None and batch.metadata.plan is None  # a planned copy
    assert not planned.plan.use_kernels and planned.plan.decode_splits == 1
    expected = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.3)
    got = paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, 0.3)
    assert torch.equal(got, expected)


def test_plan_validates_and_layers_do_not(monkeypatch):
    calls = []
    real = AttentionMetadata.validate

    def counting(self, block_size=None):
        calls.append(block_size)
        return real(self, block_size)

    monkeypatch.setattr(AttentionMetadata, "validate", counting)
    batch = _batch()
    planned = _backend().plan(batch.metadata)
    assert calls == [4]
    for _ in range(3):  # three "layers"
        paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, 0.3)
    assert calls == [4]


def test_plan_rejects_bad_metadata_and_a_foreign_cache():
    batch = _batch()
    bad = AttentionMetadata(**{**vars(batch.metadata), "num_decodes": 3, "num_decode_tokens": 3})
    with pytest.raises(ValueError, match="query_len 1"):
        _backend().plan(bad)
    planned = _backend(block_size=8).plan(_batch(block_size=8).metadata)
    with pytest.raises(ValueError, match="block_size 8"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, 0.3)
    with pytest.raises(ValueError, match="multiple"):
        PagedAttentionBackend(
            num_q_heads=5, num_kv_heads=2, head_dim=8, block_size=4,
            dtype=torch.float32, device=torch.device("cpu"),
        )  # fmt: skip


def test_an_engine_step_validates_once_whatever_the_layer_count(tmp_path, monkeypatch):
    path = make_tiny_model(tmp_path / "qwen2", "qwen2")
    # Synchronous steps: every scheduler step is one forward pass (with overlap scheduling the
    # last schedule() call finds nothing to run).
    llm = LLM(str(path), num_kv_blocks=64, async_scheduling=False)
    layers = llm.engine.model_config.num_hidden_layers
    assert layers > 1
    calls = []
    real = AttentionMetadata.validate
    monkeypatch.setattr(
        AttentionMetadata,
        "validate",
        lambda self, block_size=None: calls.append(1) or real(self, block_size),
    )
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)
    steps = llm.engine.stats()["num_steps"]
    assert steps >= 5 and len(calls) == steps  # once per step, not once per layer
