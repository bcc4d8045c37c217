"""`kubetune status`: a run's phase, pods, progress (step/total, loss, ETA) and why it waits.

Progress comes from the run's events in its storage (the spec is read back from the run's
ConfigMap), or, when the storage is not readable from here, from the leader pod's log."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from kubetune.errors import KubetuneError
from kubetune.k8s.client import Cluster, RunStatus, job_phase, pod_state

_STEP = re.compile(r"step (\d+)/(\d+)\s+loss ([\d.]+).*?eta ([\d:]+)")


def run_status(cluster: Cluster, name: str) -> RunStatus:
    job = cluster.job(name)
    phase = job_phase(job)
    status = RunStatus(name, phase, [pod_state(p) for p in cluster.pods(name)])
    queue = (job.metadata.labels or {}).get("kueue.x-k8s.io/queue-name")
    if phase == "Queued":
        status.reason = f"queued by Kueue in LocalQueue {queue} (suspended until admitted)" if queue else "suspended"
    elif phase == "Pending":
        waiting = [p.detail for p in status.pods if p.detail]
        status.reason = waiting[0] if waiting else "waiting for pods"
    elif phase == "Failed":
        conds = [c for c in (job.status.conditions or []) if c.type == "Failed"]
        status.reason = f"{conds[0].reason}: {conds[0].message}" if conds else "failed"
    status.progress = _progress(cluster, name, status)
    return status


def _progress(cluster: Cluster, name: str, status: RunStatus) -> dict[str, Any]:
    text = cluster.spec_text(name)
    if text:
        try:
            from kubetune.storage.store import Store

            output = (yaml.safe_load(text) or {}).get("output") or ""
            if "://" in output and not output.startswith("pvc://"):
                events = [json.loads(line) for line in Store(output).read_text("events.jsonl").splitlines() if line]
                steps = [e for e in events if e.get("event") == "step"]
                if steps:
                    last = steps[-1]
                    return {"step": last.get("step"), "total": last.get("total"), "loss": last.get("loss"),
                            "eta": last.get("eta"), "source": f"{output}/events.jsonl"}
        except (KubetuneError, OSError, ValueError):
            pass  # not readable from here: fall back to the log
    running = [p for p in status.pods if p.phase in ("Running", "Succeeded", "Failed")]
    if not running:
        return {}
    try:
        tail = "".join(cluster.log(running[0].name, tail=50))
    except KubetuneError:
        return {}
    found = _STEP.findall(tail)
    if not found:
        return {}
    step, total, loss, eta = found[-1]
    return {"step": int(step), "total": int(total), "loss": float(loss), "eta": eta, "source": f"pod/{running[0].name} log"}


def format_status(s: RunStatus) -> str:
    lines = [f"run {s.name}: {s.phase}" + (f" — {s.reason}" if s.reason else "")]
    p = s.progress
    if p:
        lines.append(f"  step {p.get('step')}/{p.get('total')}  loss {p.get('loss')}  eta {p.get('eta')}  (from {p.get('source')})")
    for pod in s.pods:
        lines.append(f"  pod {pod.name}: {pod.phase}" + (f" — {pod.detail}" if pod.detail else ""))
    if not s.pods:
        lines.append("  no pods yet")
    return "\n".join(lines)
