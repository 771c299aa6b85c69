"""torch's CPU thread count comes from the physical cores (issue 13, item 8)."""

from __future__ import annotations

from pathlib import Path

import torch

from kestrel.runner import cpu_threads


def _topology(root: Path, cores: list[tuple[int, int]]) -> Path:
    for cpu, (package, core) in enumerate(cores):
        t = root / f"cpu{cpu}" / "topology"
        t.mkdir(parents=True)
        (t / "physical_package_id").write_text(f"{package}\n")
        (t / "core_id").write_text(f"{core}\n")
    return root


def test_smt_siblings_count_once(tmp_path):
    # 4 logical CPUs, 2 cores with 2 threads each
    root = _topology(tmp_path, [(0, 0), (0, 1), (0, 0), (0, 1)])
    assert cpu_threads.physical_cores([0, 1, 2, 3], root) == 2
    assert cpu_threads.physical_cores([0, 2], root) == 1  # the affinity mask counts
    assert cpu_threads.physical_cores([0, 1, 9], root) == 3  # unknown topology: logical


def test_cgroup_quota_caps_the_count(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cpu_threads.cgroup_cpu_limit(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert cpu_threads.cgroup_cpu_limit(cpu_max) is None
    assert cpu_threads.cgroup_cpu_limit(tmp_path / "absent") is None


def test_environment_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("KESTREL_CPU_THREADS", "1")
        assert cpu_threads.configure_cpu_threads() == 1
        monkeypatch.delenv("KESTREL_CPU_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert cpu_threads.configure_cpu_threads() == 1  # left as the user set it
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert cpu_threads.configure_cpu_threads() == cpu_threads.cpu_thread_count()
    finally:
        torch.set_num_threads(before)
