"""`kubetune status`: a run's phase, pods, progress (step/total, loss, ETA) and why it waits.

Progress comes from the run's events in its storage (the spec is read back from the run's
ConfigMap), or, when the storage is not readable from here, from the leader pod's log."""

from __future__ import annotations

import re
from typing import Any

import yaml

from kubetune.artifacts.events import (
    CheckpointStoredEvent, EndEvent, ErrorEvent, Event, StartEvent, StepEvent, format_eta,
)
from kubetune.errors import KubetuneError
from kubetune.k8s.client import Cluster, RunStatus, job_phase, pod_state
from kubetune.runs.layout import RUN_KEYS
from kubetune.runs.sync import is_synced
from kubetune.runs.view import RunView

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
            output = (yaml.safe_load(text) or {}).get("output") or ""
            if output and is_synced(output):  # object storage is readable from here; a pod's volume is not
                found = progress_from_events(RunView(output).events())
                if found:
                    return {**found, "source": f"{output}/{RUN_KEYS.events}"}
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


def progress_from_events(events: list[Event]) -> dict[str, Any]:
    """step/total, loss and ETA from the last step event; the newest checkpoint in storage; an error."""
    steps = [e for e in events if isinstance(e, StepEvent)]
    if not steps:
        return {}
    last = steps[-1]
    out: dict[str, Any] = {"step": last.step, "total": last.total_steps, "loss": last.loss, "eta": format_eta(last.eta_s)}
    stored = [e for e in events if isinstance(e, CheckpointStoredEvent)]
    if stored:
        out["stored"] = stored[-1].uri
    starts = [i for i, e in enumerate(events) if isinstance(e, StartEvent)]
    since = events[starts[-1]:] if starts else events  # what the latest (re)start did
    if any(isinstance(e, EndEvent) for e in since):
        out["eta"] = "done"
    elif isinstance(since[-1], ErrorEvent):
        out["error"] = since[-1].error
    return out


def format_status(s: RunStatus) -> str:
    lines = [f"run {s.name}: {s.phase}" + (f" — {s.reason}" if s.reason else "")]
    p = s.progress
    if p:
        loss = f"{p['loss']:.4f}" if isinstance(p.get("loss"), float) else p.get("loss")
        lines.append(f"  step {p.get('step')}/{p.get('total')}  loss {loss}  eta {p.get('eta')}  (from {p.get('source')})")
        if p.get("stored"):
            lines.append(f"  newest checkpoint in storage: {p['stored']}")
        if p.get("error"):
            lines.append(f"  error: {p['error']}")
    for pod in s.pods:
        lines.append(f"  pod {pod.name}: {pod.phase}" + (f" — {pod.detail}" if pod.detail else ""))
    if not s.pods:
        lines.append("  no pods yet")
    return "\n".join(lines)


def format_runs(jobs: list[Any], namespace: str) -> str:
    """`kubetune list`: each run's Job, its phase and component."""
    if not jobs:
        return f"no kubetune runs in namespace {namespace}"
    lines = [f"{'RUN':<40} {'PHASE':<10} {'COMPONENT':<10}"]
    for job in sorted(jobs, key=lambda j: j.metadata.name):
        labels = job.metadata.labels or {}
        lines.append(f"{labels.get('kubetune.dev/run', job.metadata.name):<40} {job_phase(job):<10} "
                     f"{labels.get('app.kubernetes.io/component', ''):<10}")
    return "\n".join(lines)
