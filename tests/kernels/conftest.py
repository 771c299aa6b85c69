"""Fixtures of the CUDA kernel tests (every test here is marked `cuda`; CI skips them)."""

import zlib

import pytest
import torch

from tests.kernels.helpers import KernelSpy, kernel_spy, poisoned_empty


@pytest.fixture
def spy(monkeypatch) -> KernelSpy:
    """Counts kernel launches; a test asserts its op really ran a kernel, not the reference."""
    yield from kernel_spy(monkeypatch)


@pytest.fixture
def poison(monkeypatch) -> None:
    """Every floating-point torch.empty result starts as NaN, so outputs (and workspaces) the
    kernels allocate must be fully written to pass."""
    monkeypatch.setattr(torch, "empty", poisoned_empty(torch.empty))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CUDA generator seeded from the test id: fresh inputs per test and parameter set."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator(device="cuda").manual_seed(seed)
