"""The CPU budget: the affinity mask capped by the cgroup's CPU quota (a Kubernetes CPU limit).
Unit tests read cgroup trees laid out as the kernel lays them out (v1 and v2); the integration test
in tests/integration/test_cpu_limit.py runs kubetune in a real cgroup with a quota."""

from __future__ import annotations

import os
from pathlib import Path

from kubetune.cpus import cgroup_cpu_limit, cpu_budget


def tree(tmp: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp / "proc-cgroup").write_text(proc)
    return root, tmp / "proc-cgroup"


def test_v2_quota_of_the_process_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "0::/kubepods/pod1/c1\n", {
        "kubepods/pod1/c1/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "250000 100000\n",     # the pod's limit: 2.5 CPUs
        "kubepods/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(root, proc) == 2.5
    assert cpu_budget(root, proc) == min(len(os.sched_getaffinity(0)), 3)


def test_v1_cpu_controller_mounted_with_cpuacct(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) == 0.5
    assert cpu_budget(root, proc) == 1  # half a CPU still gets one thread


def test_no_quota_unreadable_or_odd_files_mean_no_limit(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "1:cpu:/\n0::/\n", {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n", "cpu.max": "garbage\n"})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(root, tmp_path / "no-such-file") is None
    assert cpu_budget(root, proc) == len(os.sched_getaffinity(0))


def test_this_machine() -> None:
    limit = cgroup_cpu_limit()
    cpus = len(os.sched_getaffinity(0))
    assert cpu_budget() == (cpus if limit is None else max(1, min(cpus, -(-limit // 1))))
