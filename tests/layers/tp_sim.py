"""Test helper: tensor parallelism simulated on CPU, without torch.distributed.

Two kinds of fake group:
- `SplitGroup`: collectives are identities that only count their calls; the test combines the
  ranks' outputs itself (sums for an all-reduce, concatenates for an all-gather).
- `ThreadGroup`: one thread per rank; collectives really exchange tensors between the threads
  (a barrier-based rendezvous), so a whole model can run sharded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from kestrel.layers import SINGLE_RANK, TensorParallelGroup

T = TypeVar("T")


@dataclass(frozen=True)
class SplitGroup(TensorParallelGroup):
    """Rank `rank` of a simulated group; all_reduce / all_gather return this rank's tensor."""

    calls: list[str] = field(default_factory=list, compare=False, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.calls.append("all_gather")
        return x


def split_group(rank: int, size: int) -> TensorParallelGroup:
    """The real size-1 group at size 1 (its early-return path), else a SplitGroup."""
    return SINGLE_RANK if size == 1 else SplitGroup(rank=rank, size=size)


class _Rendezvous:
    """Every rank deposits a tensor; each gets all of them, in rank order."""

    def __init__(self, size: int, timeout: float = 60.0) -> None:
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * size

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        parts = [t for t in self.slots if t is not None]
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        assert len(parts) == len(self.slots)
        return parts


@dataclass(frozen=True)
class ThreadGroup(TensorParallelGroup):
    rendezvous: _Rendezvous | None = field(default=None, compare=False, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        assert self.rendezvous is not None
        parts = self.rendezvous.exchange(self.rank, x)
        total = parts[0]
        for part in parts[1:]:  # the same order on every rank: identical results
            total = total + part
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        assert self.rendezvous is not None
        return torch.cat(self.rendezvous.exchange(self.rank, x), dim=dim)


def run_ranks(size: int, fn: Callable[[TensorParallelGroup], T]) -> list[T]:
    """fn(group) on `size` threads, one ThreadGroup rank each; returns the results by rank.
    At size 1, fn(SINGLE_RANK) on this thread. An exception on any rank is re-raised."""
    if size == 1:
        return [fn(SINGLE_RANK)]
    rendezvous = _Rendezvous(size)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            results[rank] = fn(ThreadGroup(rank=rank, size=size, rendezvous=rendezvous))
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller thread
            errors.append(exc)
            rendezvous.barrier.abort()  # wake the other ranks instead of deadlocking

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[rank] for rank in range(size)]


def load_full(
    module: torch.nn.Module, tensors: Mapping[str, torch.Tensor | Mapping[Any, torch.Tensor]]
) -> None:
    """Feed full checkpoint tensors through the parameters' weight loaders: name -> tensor,
    or name -> {shard_id: tensor} for a packed parameter."""
    params = dict(module.named_parameters())
    for name, value in tensors.items():
        param = params[name]
        if isinstance(value, torch.Tensor):
            param.weight_loader(param, value)
        else:
            for shard_id, tensor in value.items():
                param.weight_loader(param, tensor, shard_id)
