"""kubetune in a real cgroup with a CPU quota (what a Kubernetes CPU limit is): the CPU budget and
the serving threads follow the quota, not the machine's cores.
Needs a writable cgroup v1 cpu controller or cgroup v2 (root in a container, as in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from kubetune.cpus import CGROUP_ROOT
from tests.conftest import kubetune_cmd, quiet_env

pytestmark = pytest.mark.integration


@pytest.fixture
def one_cpu() -> Iterator[Path]:
    """A child cgroup limited to one CPU (quota = period); its cgroup.procs file."""
    name = f"kubetune-test-{uuid.uuid4().hex[:8]}"
    v1, v2 = CGROUP_ROOT / "cpu" / name, CGROUP_ROOT / name
    try:
        if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():
            v1.mkdir()
            (v1 / "cpu.cfs_period_us").write_text("100000")
            (v1 / "cpu.cfs_quota_us").write_text("100000")
            folder = v1
        else:
            v2.mkdir()
            (v2 / "cpu.max").write_text("100000 100000")
            folder = v2
    except OSError as exc:
        pytest.skip(f"no writable cgroup cpu controller here ({exc}); CI runs as root in a container")
    yield folder / "cgroup.procs"
    for pid in (folder / "cgroup.procs").read_text().split():  # leave nothing in it
        os.kill(int(pid), 9)
    folder.rmdir()


def in_cgroup(procs: Path):
    def enter() -> None:
        procs.write_text(str(os.getpid()))
    return enter


@pytest.mark.skipif(os.cpu_count() == 1, reason="a one-CPU machine has nothing to cap")
def test_budget_and_serving_threads_follow_the_quota(one_cpu: Path, tiny_model: Path) -> None:
    code = "from kubetune.cpus import cpu_budget, cgroup_cpu_limit; print(cpu_budget(), cgroup_cpu_limit())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=quiet_env(),
                         preexec_fn=in_cgroup(one_cpu), check=True).stdout.split()
    assert out == ["1", "1.0"]
    outside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=quiet_env(),
                             check=True).stdout.split()
    assert outside[0] == str(len(os.sched_getaffinity(0)))

    # Served in the cgroup: 1 thread (and so one process under --workers auto), not the machine's cores.
    proc = subprocess.Popen(kubetune_cmd("serve", str(tiny_model), "--port", "0", "--workers", "auto"),
                            env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=in_cgroup(one_cpu))
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.kill()
        proc.wait()
    started = next((line for line in lines if line.startswith("serving ")), "")
    assert "in this process, 1 threads" in started, lines
