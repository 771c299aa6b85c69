"""Paged decode and prefill attention kernels against a dense fp32 oracle on the ground-truth
K/V. Cache rows outside every context are NaN and padded block-table entries are -1 or 2^30, so a
read outside the context shows up; outputs and split workspaces start as NaN (poison)."""

import pytest
import torch

from kestrel.ops import KernelError, attention_cuda, paged_attention
from tests.kernels.helpers import (
    DTYPES,
    assert_close,
    dense_attention,
    make_paged_batch,
    set_kernel_env,
)

pytestmark = pytest.mark.cuda

GQA = [(8, 8), (12, 4), (16, 4), (28, 4)]  # group sizes 1, 3, 4, 7
HEAD_DIMS = [64, 128, 256]


def _run(batch, spy, decodes: bool, prefills: bool) -> torch.Tensor:
    scale = batch.q.shape[2] ** -0.5
    out = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, scale)
    assert spy.calls["paged_decode_attention"] == int(decodes)
    assert spy.calls["paged_prefill_attention"] == int(prefills)
    return out


def _check(batch, out, dtype, what):
    num_tokens = batch.metadata.num_tokens
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert_close(out[:num_tokens], dense_attention(batch, batch.q.shape[2] ** -0.5), dtype, what)
    assert bool((out[num_tokens:] == 0).all()), "padding rows must be zero"


@pytest.fixture(params=["tc", "cuda_cores"])
def decode_kernel(request, monkeypatch) -> str:
    """Runs a test with the tensor-core decode for every GQA group >= 2 and with none."""
    monkeypatch.setattr(attention_cuda, "TC_MIN_GROUP", 2 if request.param == "tc" else 1000)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA)
def test_decode_split(dtype, head_dim, num_q_heads, num_kv_heads, decode_kernel, gen, spy, poison):
    """Small batch, long and short contexts: several splits, some of them empty."""
    lens = [(1, s) for s in (1, 15, 16, 17, 257, 1000, 4096)]
    batch = make_paged_batch(lens, 7, num_q_heads, num_kv_heads, head_dim, dtype, gen)
    splits = attention_cuda.decode_plan(batch.q, num_kv_heads, 7, 4096)
    assert splits > 1
    _check(batch, _run(batch, spy, True, False), dtype, "decode (split)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [*GQA, (32, 2), (64, 2)])
def test_decode_single_split(
    dtype, head_dim, num_q_heads, num_kv_heads, decode_kernel, gen, spy, poison
):
    """Contexts <= 256 tokens: one split, the kernel writes the output directly."""
    lens = [(1, s) for s in (1, 2, 31, 64, 100, 255, 256)] * 3
    batch = make_paged_batch(lens, len(lens), num_q_heads, num_kv_heads, head_dim, dtype, gen)
    _check(batch, _run(batch, spy, True, False), dtype, "decode (one split)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_16k(dtype, block_size, decode_kernel, gen, spy, poison):
    lens = [(1, 16384), (1, 16000), (1, 9)]
    batch = make_paged_batch(lens, 3, 28, 4, 128, dtype, gen, block_size=block_size)
    _check(batch, _run(batch, spy, True, False), dtype, "decode 16k")


# (query_len, seq_len): chunks with and without cached prefixes, tiles cut at odd places.
PREFILL = [(17, 50), (33, 33), (16, 16), (4, 37), (64, 64), (65, 200), (130, 1000), (1, 5)]


@pytest.fixture(params=["auto", "mma"])
def prefill_kernel(request, monkeypatch) -> str:
    """Runs a test with the default prefill kernel (wgmma on an H100) and with mma.sync."""
    set_kernel_env(monkeypatch, attention_cuda.PREFILL_KERNEL_ENV, request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA)
def test_prefill(dtype, head_dim, num_q_heads, num_kv_heads, prefill_kernel, gen, spy, poison):
    batch = make_paged_batch(PREFILL, 0, num_q_heads, num_kv_heads, head_dim, dtype, gen)
    _check(batch, _run(batch, spy, False, True), dtype, f"prefill ({prefill_kernel})")


# Query tiles cut at the 64 / 128-row block edges (the wgmma kernel's tile for head_dim 128 is 128
# rows, two warpgroups of 64), cached prefixes that are not multiples of the 128-key tile.
PREFILL_EDGES = [(127, 127), (128, 300), (129, 129), (257, 257), (192, 1000), (63, 191)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_tile_edges(dtype, head_dim, prefill_kernel, gen, spy, poison):
    batch = make_paged_batch(PREFILL_EDGES, 0, 16, 4, head_dim, dtype, gen)
    _check(batch, _run(batch, spy, False, True), dtype, f"prefill edges ({prefill_kernel})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32, 24])
def test_mixed_batch_with_padding(dtype, head_dim, block_size, prefill_kernel, gen, spy, poison):
    lens = [(1, 1), (1, 700), (1, 33), (200, 200), (37, 4000), (1, 2), (90, 91)]
    batch = make_paged_batch(
        lens, 3, 28, 4, head_dim, dtype, gen, block_size=block_size, pad_rows=5
    )
    _check(batch, _run(batch, spy, True, True), dtype, "mixed")


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_16k_context(dtype, prefill_kernel, gen, spy, poison):
    """A 300-token chunk after a 16k cached prefix, next to a long decode."""
    lens = [(1, 16384), (300, 16384), (2048, 2048)]
    batch = make_paged_batch(lens, 1, 32, 8, 128, dtype, gen)
    _check(batch, _run(batch, spy, True, True), dtype, "prefill 16k")


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_replay_matches_eager(dtype, gen, spy):
    lens = [(1, 3000), (1, 40), (1, 517), (129, 300), (64, 64)]
    batch = make_paged_batch(lens, 3, 16, 4, 128, dtype, gen, pad_rows=3)
    scale = 128**-0.5
    args = (batch.key_cache, batch.value_cache, batch.metadata, scale)
    eager = paged_attention(batch.q, *args)  # warm-up: allocates the split workspace
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = paged_attention(batch.q, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert spy.calls["paged_decode_attention"] == 2 and spy.calls["paged_prefill_attention"] == 2
    # New query values in the same storage: the replay must follow them.
    batch.q.copy_(torch.randn(batch.q.shape, generator=gen, device="cuda").to(dtype))
    graph.replay()
    fresh = paged_attention(batch.q, *args)
    torch.cuda.synchronize()
    assert torch.equal(captured, fresh)
    assert not torch.equal(fresh, eager)
    _check(batch, captured, dtype, "graph replay")


def test_wgmma_request_on_256_is_an_error(gen, spy, monkeypatch):
    """head_dim 256 has no wgmma kernel: forcing it must raise, naming the op."""
    set_kernel_env(monkeypatch, attention_cuda.PREFILL_KERNEL_ENV, "wgmma")
    batch = make_paged_batch([(20, 30)], 0, 4, 4, 256, torch.bfloat16, gen)
    with pytest.raises(KernelError, match=r"paged_attention \(prefill\)"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.0625)


def test_kernel_error_names_the_op(gen, spy, monkeypatch):
    batch = make_paged_batch([(1, 600)], 1, 8, 8, 64, torch.bfloat16, gen)
    # 70000 splits exceed the grid limit the launcher accepts: it returns an error code.
    monkeypatch.setattr(attention_cuda, "decode_plan", lambda *a: 70000)
    with pytest.raises(KernelError, match=r"paged_attention \(decode\)"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.125)
