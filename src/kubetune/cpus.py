"""How many CPUs this process may really use.

`os.cpu_count()` and torch's default intra-op thread count see the machine (torch: the affinity
mask at most), not the CFS quota of the process's cgroup — which is what a Kubernetes CPU limit is.
A pod limited to 4 CPUs on a 64-core node would otherwise run 64 threads per step, throttled by the
kernel every period: the quota is the budget, rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs in the affinity mask, capped by the cgroup CPU limit (rounded up) when there is one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root, proc_cgroup)
    return max(1, min(cpus, math.ceil(limit))) if limit is not None else cpus


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, cgroup v1 or v2;
    None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy (at the root, or at unified/ in hybrid mode)
            for base in (root, root / "unified"):
                limits += _along(base, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller, mounted alone or with cpuacct
            for base in {root / controllers, root / "cpu", root / "cpu,cpuacct"}:
                limits += _along(base, path, _v1_limit)
    return min(limits) if limits else None


def _along(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits set on the cgroup at `path` under `base` and on each of its ancestors."""
    parts = [p for p in path.split("/") if p]
    found = []
    for depth in range(len(parts), -1, -1):
        limit = read(base.joinpath(*parts[:depth]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def fit_torch_threads() -> int:
    """Lower torch's intra-op threads to the CPU budget unless OMP_NUM_THREADS says otherwise; the count."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        budget = cpu_budget()
        if torch.get_num_threads() > budget:
            torch.set_num_threads(budget)
    return torch.get_num_threads()
