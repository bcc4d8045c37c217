"""What the dashboard shows, read from runs themselves (spec.yaml, events.jsonl, eval/): every run
the caller may see — their jobs, and every run under the folders and bucket prefixes the server was
started with (`--runs`) — with status and progress, curves, the eval report, and sweeps ranked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import yaml

from kubetune.artifacts.events import (EndEvent, ErrorEvent, EvalEvent, EvalReportEvent, Event, PreemptedEvent,
                                       StartEvent, StepEvent)
from kubetune.errors import KubetuneError
from kubetune.runs.layout import RUN_KEYS
from kubetune.runs.view import RunView
from kubetune.storage.store import Store
from kubetune.uris import hub_ref, is_hub, uri_basename

__all__ = ["RunRef", "cluster_runs", "curves", "find_runs", "run_detail", "sweeps", "summary"]

LOWER_IS_BETTER = ("loss", "perplexity", "eval_loss")


@dataclass(frozen=True)
class RunRef:
    id: str              # a job id, or the run's URI
    uri: str
    source: str          # "job", or the --runs root it was found under
    status: str | None = None   # a job's own status (the run's is read from its events otherwise)
    name: str | None = None
    model: str | None = None    # a job's model as its owner named it
    sweep: str | None = None    # a job's metadata.sweep: its owner's grouping


def find_runs(roots: Sequence[str]) -> list[RunRef]:
    """Every run folder (one with spec.yaml) directly under each root."""
    out = []
    for i, root in enumerate(roots):
        try:
            store = Store(root)
            names = [n for n in store.listdir("") if store.exists(f"{n}/{RUN_KEYS.spec}")]
        except (KubetuneError, OSError):
            continue
        # Named by the root's place in --runs and the run's name: no path of the server's reaches a page.
        label = "runs" if i == 0 else f"runs{i + 1}"
        out += [RunRef(f"{label}:{n}", f"{root.rstrip('/')}/{n}", label, name=n) for n in names]
    return out


PHASES = {"Succeeded": "succeeded", "Failed": "failed", "Running": "running", "Queued": "queued",
          "Pending": "queued"}


def cluster_runs(namespaces: Sequence[str], hidden: Callable[[str], bool]) -> list[RunRef]:
    """Training Jobs kubetune made in each namespace (`kubetune submit`, sweeps), with the status of
    the Job and the output their spec ConfigMap names; `hidden(name)`: a control-plane job, shown
    (to its owner only) as a job instead."""
    from kubetune.k8s.client import Cluster, job_phase

    out = []
    for namespace in namespaces:
        try:
            cluster = Cluster(namespace)
            jobs = cluster.jobs()
        except KubetuneError:
            continue
        for job in jobs:
            name = job.metadata.name
            if (job.metadata.labels or {}).get("app.kubernetes.io/component") != "train" or hidden(name):
                continue
            try:
                text = cluster.spec_text(name)
            except KubetuneError:
                text = None
            output = ((yaml.safe_load(text) or {}).get("output") if text else None) or f"runs/{name}"
            out.append(RunRef(f"k8s:{namespace}/{name}", output, f"cluster/{namespace}",
                              PHASES.get(job_phase(job), "queued"), name))
    return out


def _spec(uri: str) -> dict[str, Any]:
    try:
        found = yaml.safe_load(RunView(uri).spec_text() or "")
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def run_state(events: list[Event]) -> str:
    starts = [i for i, e in enumerate(events) if isinstance(e, StartEvent)]
    since = events[starts[-1]:] if starts else events
    if any(isinstance(e, EvalReportEvent) for e in events) or any(isinstance(e, EndEvent) for e in since):
        return "succeeded"
    if since and isinstance(since[-1], ErrorEvent):
        return "failed"
    if since and isinstance(since[-1], PreemptedEvent):
        return "stopped"
    return "running" if starts else "not started"


def summary(ref: RunRef, events: list[Event] | None = None) -> dict[str, Any]:
    events = RunView(ref.uri).events() if events is None else events
    spec = _spec(ref.uri)
    steps = [e for e in events if isinstance(e, StepEvent)]
    reports = [e for e in events if isinstance(e, EvalReportEvent)]
    evals = [e for e in events if isinstance(e, EvalEvent) and e.loss is not None]
    last = steps[-1] if steps else None
    return {
        "id": ref.id, "name": ref.name or spec.get("name") or ref.uri.rsplit("/", 1)[-1],
        "source": ref.source, "status": ref.status or run_state(events),
        "model": ref.model or _model_name((spec.get("model") or {}).get("base")),
        "method": (spec.get("method") or {}).get("type"),
        "sweep": ref.sweep or (spec.get("kubernetes") or {}).get("sweep"),
        "step": last.step if last else 0, "total_steps": last.total_steps if last else None,
        "loss": last.loss if last else None, "eval_loss": evals[-1].loss if evals else None,
        "eta_s": last.eta_s if last else None, "tokens_per_s": last.tokens_per_s if last else None,
        "metrics": reports[-1].metrics.get("tuned", {}) if reports else {},
        "updated": events[-1].time if events else None,
    }


def _model_name(base: object) -> str | None:
    """A base model as a page shows it: a Hub id, or a folder's or URI's last part (never a path)."""
    if not isinstance(base, str):
        return None
    return hub_ref(base)[0] if is_hub(base) else uri_basename(base)


def curves(events: list[Event]) -> list[dict[str, Any]]:
    """Loss, learning rate and tokens/s by logged step."""
    return [{"step": e.step, "loss": e.loss, "learning_rate": e.learning_rate, "tokens_per_s": e.tokens_per_s}
            for e in events if isinstance(e, StepEvent)]


def run_detail(ref: RunRef) -> dict[str, Any]:
    view = RunView(ref.uri)
    events = view.events()
    evals = [{"step": e.step, "loss": e.loss} for e in events if isinstance(e, EvalEvent)]
    return {"run": summary(ref, events), "curves": curves(events), "evals": evals,
            "eval": {"metrics": view.eval_metrics(), "samples": view.eval_samples(20)}}


def sweeps(runs: list[dict[str, Any]], details: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Runs grouped by sweep, best first: by the tuned eval metric they share (rougeL, else loss), else
    by their last training loss; each with its loss curve for the overlay."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("sweep"):
            groups.setdefault(run["sweep"], []).append(run)
    out = []
    for name, members in sorted(groups.items()):
        names = set.intersection(*(set(r["metrics"]) for r in members)) if all(r["metrics"] for r in members) else set()
        metric = "rougeL" if "rougeL" in names else "loss" if "loss" in names else "train loss"

        def value(r: dict[str, Any]) -> float | None:
            return r["metrics"].get(metric) if metric != "train loss" else r["loss"]

        sign = 1 if metric in LOWER_IS_BETTER or metric == "train loss" else -1
        ranked = sorted(members, key=lambda r: (value(r) is None, sign * (value(r) or 0), r["name"]))
        out.append({"sweep": name, "metric": metric, "lower_is_better": sign == 1,
                    "runs": [{"id": r["id"], "name": r["name"], "status": r["status"], "value": value(r),
                              "curve": [(c["step"], c["loss"]) for c in details.get(r["id"], []) if c["loss"] is not None]}
                             for r in ranked]})
    return out
