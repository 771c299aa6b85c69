"""Kernel dispatch on the GPU: layers built on CUDA pick the kernels for fp16/bf16 and the
references for fp32 (so an fp32 layer captures into a graph without a fallback), and a
dispatching op that falls back on a CUDA tensor during capture raises."""

from __future__ import annotations

import pytest
import torch

from kestrel import ops
from kestrel.layers import PagedAttention, RMSNorm
from tests.kernels.helpers import randn

pytestmark = pytest.mark.cuda


def _capture(fn):
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_layers_dispatch_to_the_kernels(dtype, gen, spy):
    norm = RMSNorm(64, 1e-6, dtype, "cuda")
    assert norm._rms_norm is ops.rms_norm
    attn = PagedAttention(4, 2, 64, 0.125, dtype=dtype, device="cuda")
    assert attn._rotary_and_cache is ops.rotary_embedding_and_cache
    x = randn(5, 64, dtype=dtype, gen=gen)
    y, _ = norm(x)
    assert spy.calls["rms_norm"] == 1
    assert torch.equal(y, ops.rms_norm(x, norm.weight, 1e-6))


def test_fp32_layer_uses_the_reference_and_captures(gen, spy):
    norm = RMSNorm(64, 1e-6, torch.float32, "cuda")
    assert norm._rms_norm is ops.rms_norm_reference
    x = randn(5, 64, dtype=torch.float32, gen=gen)
    eager, _ = norm(x)
    graph, (captured, _) = _capture(lambda: norm(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert sum(spy.calls.values()) == 0


def test_fallback_on_cuda_under_capture_raises(gen, spy):
    x = randn(5, 64, dtype=torch.float32, gen=gen)  # no kernel takes fp32
    w = torch.ones(64, device="cuda")
    ops.rms_norm(x, w, 1e-6)  # outside capture: a logged fallback
    with pytest.raises(RuntimeError, match="rms_norm fell back to the torch reference"):
        _capture(lambda: ops.rms_norm(x, w, 1e-6))
    torch.cuda.synchronize()
