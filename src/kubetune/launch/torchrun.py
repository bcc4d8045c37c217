"""Several local devices (or one node of several): re-run `kubetune train` under torchrun, one
process per device; this process holds the run's lease for its ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubetune import settings
from kubetune.artifacts.events import PreemptedEvent
from kubetune.cpus import cpu_budget
from kubetune.errors import EXIT_PREEMPTED, EXIT_TRANSIENT, EXIT_USAGE, LeaseHeld, UsageError
from kubetune.spec.models import RunSpec
from kubetune.runs.lease import Lease
from kubetune.runs.run import Run
from kubetune.train.runner import prepare_output


def torchrun_command(spec_path: str, overrides: list[str], nproc: int, nodes: int = 1, run_id: str = "kubetune",
                     rdzv_endpoint: str | None = None) -> list[str]:
    if nodes > 1:
        where = ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_endpoint),
                 "--rdzv-id", run_id]
    else:
        where = ["--standalone"]
    cmd = [sys.executable, "-m", "kubetune.launch.agent", *where, f"--nproc_per_node={nproc}",
           "-m", "kubetune", "train", spec_path]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_torchrun(spec: RunSpec, spec_path: str, overrides: list[str], wait: bool = False) -> int:
    """Run torchrun in the foreground and return its exit code; Ctrl-C/SIGTERM reach every rank.
    This process holds the run's lease for the ranks (on several nodes, node 0 holds it)."""
    nodes = spec.resources.nodes
    endpoint = settings.rdzv_endpoint()
    if nodes > 1 and not endpoint:
        raise UsageError("resources.nodes > 1 needs a cluster", "run it with `kubetune submit`, or set resources.nodes: 1")
    # storage checks, the lease and the pull of a remote run happen once per node, before the ranks start
    leader = os.environ.get("JOB_COMPLETION_INDEX", "0") == "0"
    _, lease = prepare_output(spec, wait=wait, lease=leader)
    try:
        return _run_torchrun(spec, spec_path, overrides, endpoint, lease)
    finally:
        if lease is not None:
            lease.release()


def _run_torchrun(spec: RunSpec, spec_path: str, overrides: list[str], endpoint: str | None, lease: Lease | None) -> int:
    env = dict(os.environ)
    exits = Path(tempfile.mkdtemp(prefix="kubetune-ranks-"))
    env[settings.RANK_EXITS] = str(exits)
    try:
        return _supervise(spec, spec_path, overrides, endpoint, lease, env, exits)
    finally:
        shutil.rmtree(exits, ignore_errors=True)


def _supervise(spec: RunSpec, spec_path: str, overrides: list[str], endpoint: str | None, lease: Lease | None,
               env: dict[str, str], exits: Path) -> int:
    nodes, nproc = spec.resources.nodes, spec.resources.devices_per_node
    if spec.resources.accelerator in ("cpu", "auto"):
        # On CPU each rank gets its share of the CPUs this process may use (a pod's CPU limit included);
        # oversubscribed threads make DDP slower, not faster.
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_budget() // nproc)))
    print(f"launching {nproc} processes{f' on each of {nodes} nodes' if nodes > 1 else ''} with torchrun", flush=True)
    # its own process group: a lost lease stops every rank at once, and signals arrive only as forwarded
    started = time.time()
    proc = subprocess.Popen(torchrun_command(spec_path, overrides, nproc, nodes, spec.name, endpoint), env=env,
                            start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if lease is not None and lease.lost:
                    os.killpg(proc.pid, signal.SIGKILL)  # not a checkpoint more: the run has another writer
                    proc.wait()
                    raise LeaseHeld("stopped: another trainer took over this run's lease",
                                    "nothing was written after the lease was lost; the other trainer continues the run")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    # torchrun answers a forwarded SIGTERM with its own error exit; what matters is whether the ranks
    # saved a checkpoint and stopped (they record it), which makes this a resumable preemption.
    # (only this attempt's: a run preempted before and now failing must not read as preempted again)
    last = Run.for_spec(spec).events()[-1:] if code else []
    if last and isinstance(last[0], PreemptedEvent) and last[0].time >= started - 1:
        print(f"stopped at step {last[0].step} after saving {last[0].checkpoint}; run the same command "
              "again to resume", flush=True)
        return EXIT_PREEMPTED
    return rank_exit(code, exits)


def rank_exit(code: int, folder: Path) -> int:
    """The exit code that says what happened: torchrun exits 1 for any failed rank, so a rank's own
    code (2: bad input, 75: transient) and reason are read from the file it left; the most telling one
    wins and its reason is said here, once (the ranks leave theirs unsaid: cli._left_for_the_launcher)."""
    if not code:
        return 0
    left = [_rank_report(f) for f in sorted(folder.glob("rank-*"))] if folder.is_dir() else []
    for meaning in (EXIT_USAGE, EXIT_TRANSIENT, EXIT_PREEMPTED, *sorted({c for c, _ in left})):
        if any(c == meaning for c, _ in left):
            # its reason; else (a rank that said nothing: killed, or it printed its own) any rank's
            said = [m for c, m in left if c == meaning and m] or [m for _, m in left if m]
            if said:
                print(said[0], file=sys.stderr, flush=True)
            return meaning
    return code


def _rank_report(path: Path) -> tuple[int, str | None]:
    try:
        found = json.loads(path.read_text() or "1")
    except (OSError, ValueError):
        return 1, None
    if isinstance(found, int):
        return found, None
    return int(found.get("code") or 1), found.get("message")
