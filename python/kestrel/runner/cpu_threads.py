"""torch's CPU thread count from the physical cores this process may use.

torch's default is one intra-op thread per logical CPU (OpenMP's). On a machine with SMT two
threads then share each core's vector units, and in a container whose CPU quota is below the
host's CPU count the threads outnumber the CPU time there is; both make the CPU path slower.
`cpu_thread_count()` counts distinct physical cores among the CPUs of this process's affinity
mask (Linux sysfs topology; logical CPUs elsewhere), capped by a cgroup v2 `cpu.max` quota.
`configure_cpu_threads()` applies it unless the user chose: `OMP_NUM_THREADS` or
`KESTREL_CPU_THREADS` set means torch keeps (or is given) that number.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sys_cpu: Path = _SYS_CPU) -> int:
    """Distinct (package, core) pairs among `cpus`; len(cpus) when the topology is unknown."""
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def cgroup_cpu_limit(cpu_max: Path = _CGROUP_CPU_MAX) -> int | None:
    """CPUs' worth of time allowed by a cgroup v2 quota ("max" or absent: None)."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def cpu_thread_count() -> int:
    count = physical_cores(_allowed_cpus())
    limit = cgroup_cpu_limit()
    return max(1, min(count, limit) if limit is not None else count)


def configure_cpu_threads() -> int:
    """Sets torch's intra-op threads (see the module docstring); returns the count in use."""
    import torch

    chosen = os.environ.get("KESTREL_CPU_THREADS")
    if chosen:
        torch.set_num_threads(max(1, int(chosen)))
    elif not os.environ.get("OMP_NUM_THREADS"):
        count = cpu_thread_count()
        if count != torch.get_num_threads():
            logger.info(
                "torch CPU threads: %d (physical cores available; was %d)",
                count,
                torch.get_num_threads(),
            )
            torch.set_num_threads(count)
    return torch.get_num_threads()
