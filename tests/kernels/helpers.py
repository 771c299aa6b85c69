"""Helpers for the CUDA kernel tests: error metric, tolerances, output poisoning, a kernel-call
spy, and paged batches whose unused cache rows hold NaN."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from kestrel.ops import AttentionMetadata, _dispatch

# ‖out − ref‖ / ‖ref‖ bounds against an fp32 oracle (issue 6): fp16 about 1e-3, bf16 up to 1e-2.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; inf when out holds a NaN or an inf."""
    out64, ref64 = out.double(), ref.double()
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm())


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]}"


class KernelSpy:
    """Stands in for kestrel._kernels and counts the launches that go through it."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str):
        target = getattr(self._module, name)
        if not callable(target) or name == "error_string":
            return target

        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            return target(*args, **kwargs)

        return wrapped


def poisoned_empty(original):
    """torch.empty that fills floating-point results with NaN (so unwritten outputs show)."""

    def empty(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return empty


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, device="cuda") -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens_padded, Hq, D] (a view into a wider qkv-like buffer)
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D]: the ground truth
    values: list[torch.Tensor]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]; rows holding no context are NaN
    value_cache: torch.Tensor
    metadata: AttentionMetadata


def make_paged_batch(
    lens: list[tuple[int, int]],
    num_decodes: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    block_size: int = 16,
    pad_rows: int = 0,
) -> PagedBatch:
    """(query_len, seq_len) per sequence, decodes first. Blocks are shuffled across the pool;
    cache rows that hold no context, spare blocks and padded block-table entries (-1 or a huge
    id) are poison, so any read outside the context shows up as NaN or a fault."""
    blocks_needed = [-(-s // block_size) for _, s in lens]
    num_blocks = sum(blocks_needed) + 5
    max_blocks = max(blocks_needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(gen.initial_seed()))
    free = order.tolist()
    tables = torch.empty(len(lens), max_blocks, dtype=torch.int32)
    keys, values, slots = [], [], []
    for i, (query_len, seq_len) in enumerate(lens):
        tables[i] = -1 if i % 2 else 2**30
        used = torch.tensor([free.pop() for _ in range(blocks_needed[i])], dtype=torch.int64)
        tables[i, : len(used)] = used.int()
        k = randn(seq_len, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        v = randn(seq_len, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        pos = torch.arange(seq_len)
        blk = used[pos // block_size].cuda()
        key_cache[blk, (pos % block_size).cuda()] = k
        value_cache[blk, (pos % block_size).cuda()] = v
        keys.append(k)
        values.append(v)
        new = pos[seq_len - query_len :]
        slots.append(used[new // block_size] * block_size + new % block_size)
    query_lens = [q for q, _ in lens]
    num_tokens = sum(query_lens)
    # q as a view with a token stride wider than Hq * D, as the model's fused qkv gives it.
    wide = randn(num_tokens + pad_rows, (num_q_heads + 2) * head_dim, dtype=dtype, gen=gen)
    q = wide[:, : num_q_heads * head_dim].view(num_tokens + pad_rows, num_q_heads, head_dim)
    qsl = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0).int()
    seq_lens = torch.tensor([s for _, s in lens], dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.cat(slots).cuda(),
        query_start_loc=qsl.cuda(),
        seq_lens=seq_lens.cuda(),
        block_tables=tables.cuda(),
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(s for _, s in lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return PagedBatch(q, keys, values, key_cache, value_cache, metadata)


def dense_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """fp32 oracle on the contiguous ground truth: [num_tokens, Hq, D], causal per sequence."""
    num_q_heads = batch.q.shape[1]
    starts = batch.metadata.query_start_loc_cpu.tolist()
    out = torch.empty(starts[-1], num_q_heads, batch.q.shape[2], device="cuda")
    for i, (k, v) in enumerate(zip(batch.keys, batch.values)):
        group = num_q_heads // k.shape[1]
        kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        begin, end = starts[i], starts[i + 1]
        seq_len, query_len = k.shape[0], end - begin
        qf = batch.q[begin:end].float().transpose(0, 1)  # [Hq, query_len, D]
        scores = torch.einsum("hqd,hkd->hqk", qf, kf) * scale
        q_pos = torch.arange(seq_len - query_len, seq_len, device="cuda")
        hidden = torch.arange(seq_len, device="cuda")[None, :] > q_pos[:, None]
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out[begin:end] = torch.einsum("hqk,hkd->hqd", probs, vf).transpose(0, 1)
    return out


def set_kernel_env(monkeypatch, name: str, value: str | None) -> None:
    """Set (None: remove) a kernel environment switch for one test and re-read the settings
    (`_dispatch.settings`, read once at import); both are restored after the test."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings.from_env())


def kernel_spy(monkeypatch) -> Iterator[KernelSpy]:
    """Install a KernelSpy over kestrel._kernels (fails when the kernels are not built)."""
    assert _dispatch.kernels is not None, "kestrel._kernels is not built"
    spy = KernelSpy(_dispatch.kernels)
    monkeypatch.setattr(_dispatch, "kernels", spy)
    set_kernel_env(monkeypatch, _dispatch.DISABLE_ENV, None)
    yield spy
