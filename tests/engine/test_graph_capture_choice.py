"""Which engines capture CUDA graphs (kestrel/runner/capture.py `why_no_graphs`): the reasons
an engine runs eagerly, checked without a GPU (the device and the kernels are stood in for)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kestrel import EngineConfig
from kestrel.ops import _dispatch
from kestrel.ops.kv_quant import FP8_KV_DTYPE
from kestrel.runner import capture


def _runner(device="cuda", dtype=torch.bfloat16, kv=None):
    return SimpleNamespace(
        device=torch.device(device), dtype=dtype, kv_cache_dtype=kv if kv is not None else dtype
    )


@pytest.fixture()
def kernels(monkeypatch):
    monkeypatch.setattr(capture, "kernels_available", lambda: True)


def test_reasons(kernels, monkeypatch):
    cfg = EngineConfig(model="m")
    assert capture.why_no_graphs(cfg, _runner(), multi_process=False) is None
    assert capture.why_no_graphs(cfg, _runner("cpu"), multi_process=False) == "eager"
    eager = EngineConfig(model="m", enforce_eager=True)
    assert capture.why_no_graphs(eager, _runner(), multi_process=False) == "eager"
    assert "parallelism" in capture.why_no_graphs(cfg, _runner(), multi_process=True)
    assert "fp16/bf16" in capture.why_no_graphs(
        cfg, _runner(dtype=torch.float32), multi_process=False
    )
    fp8 = _runner(kv=FP8_KV_DTYPE)
    assert capture.why_no_graphs(cfg, fp8, multi_process=False) is None  # verified: on
    monkeypatch.setattr(
        _dispatch, "UNVERIFIED_OPS", _dispatch.UNVERIFIED_OPS | {_dispatch.FP8_KV_OP}
    )
    assert "not verified" in capture.why_no_graphs(cfg, fp8, multi_process=False)


def test_without_kernels(monkeypatch):
    monkeypatch.setattr(capture, "kernels_available", lambda: False)
    why = capture.why_no_graphs(EngineConfig(model="m"), _runner(), multi_process=False)
    assert "not built" in why
