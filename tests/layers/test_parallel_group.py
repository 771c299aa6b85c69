"""TensorParallelGroup: identity at size 1, validation, and its real collectives (gloo, 2 ranks)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kestrel.layers import SINGLE_RANK, TensorParallelGroup


def test_size_one_collectives_return_the_input_itself() -> None:
    x = torch.randn(3, 4)
    assert SINGLE_RANK == TensorParallelGroup() and (SINGLE_RANK.rank, SINGLE_RANK.size) == (0, 1)
    assert SINGLE_RANK.all_reduce(x) is x
    assert SINGLE_RANK.all_gather(x, dim=-1) is x
    assert SINGLE_RANK.all_gather(x, dim=0) is x


@pytest.mark.parametrize(("rank", "size"), [(0, 0), (2, 2), (-1, 2)])
def test_invalid_rank_or_size(rank: int, size: int) -> None:
    with pytest.raises(ValueError, match="0 <= rank < size"):
        TensorParallelGroup(rank=rank, size=size)
    with pytest.raises(TypeError):
        TensorParallelGroup(rank=0, size=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, size: int, port: int, queue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    try:
        group = TensorParallelGroup.from_process_group()
        x = torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * rank  # [2, 3]
        gathered = {dim: group.all_gather(x, dim=dim).tolist() for dim in (0, 1, -1)}
        reduced = group.all_reduce(x.clone()).tolist()
        # Plain lists: tensors shared with the parent would not outlive this process.
        queue.put((rank, group.rank, group.size, gathered, reduced))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_real_collectives_over_gloo() -> None:
    size = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _collectives, args=(size, _free_port(), queue), nprocs=size, start_method="spawn"
    )
    results = sorted(queue.get(timeout=60) for _ in range(size))
    parts = [torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * r for r in range(size)]
    for rank, group_rank, group_size, gathered, reduced in results:
        assert (group_rank, group_size) == (rank, size)
        assert gathered[0] == torch.cat(parts, dim=0).tolist()
        assert gathered[1] == gathered[-1] == torch.cat(parts, dim=1).tolist()
        assert reduced == (parts[0] + parts[1]).tolist()
