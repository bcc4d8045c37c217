"""Succeeded jobs' adapters in the operator's vLLM Deployments, without a redeploy.

The operator deploys a base model with `serve.runtime_adapters` (a vLLM Deployment, its ConfigMap
NAME-serve-adapters and the sidecar that loads what it lists) and names it in server.yaml:
`serving: {kubernetes: {BASE: NAMESPACE/CONFIGMAP}}`, BASE being the base model's last path part.
When a job of that base succeeds its adapter is added to the list; when its model is deleted it
is taken off (before its run is removed, so no replica keeps serving it). The list keeps the
newest `serving.max_loras` adapters. Updates are optimistic: the ConfigMap's resourceVersion goes
with each write and a conflicting write is read and tried again.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from kubetune.runs.layout import serves_merged
from kubetune.errors import TransientError
from kubetune.k8s.client import Cluster
from kubetune.k8s.render.serve import served_run
from kubetune.spec.models import RunSpec
from kubetune.uris import uri_basename

__all__ = ["listing_for", "update_listing", "updated"]

KEY = "adapters.json"
MERGE_PATCH = "application/merge-patch+json"
_LOCK = threading.Lock()


def listing_for(spec: RunSpec, deployments: dict[str, str]) -> tuple[str, str] | None:
    """(namespace, ConfigMap) listing the adapters served on the job's base, or None (no
    Deployment of that base configured, or a full fine-tune: not an adapter)."""
    if serves_merged(spec):
        return None
    base = uri_basename(spec.model.base)  # (without a hf:// revision)
    ref = deployments.get(base)
    if ref is None:
        return None
    namespace, _, name = ref.partition("/")
    return namespace, name


def updated(current: list[dict[str, Any]], add: dict[str, str] | None, remove: str | None,
            max_loras: int) -> list[dict[str, Any]]:
    """The list with `add` last (newest) and `remove` gone, the newest `max_loras` kept."""
    gone = {remove, add["name"] if add else None}
    out = [e for e in current if isinstance(e, dict) and e.get("name") not in gone]
    if add is not None:
        out.append(add)
    return out[-max_loras:]


def update_listing(cluster: Cluster, name: str, spec: RunSpec, run_uri: str, model: str, added: bool,
                   max_loras: int) -> None:
    """Add (added) or remove `model`'s adapter in the ConfigMap `name`; KubetuneError when the
    cluster refuses or cannot be reached."""
    path = f"/api/v1/namespaces/{cluster.namespace}/configmaps/{name}"
    entry = {"name": model, "uri": served_run(spec, run_uri).uri} if added else None
    with _LOCK:  # this server's own writers in turn; other replicas by resourceVersion
        for _ in range(5):
            found = cluster.request("GET", path, tolerate=(404,))
            if found == 404:
                if not added:
                    return
                body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                        "data": {KEY: json.dumps({"adapters": [entry]}, indent=1)}}
                if cluster.request("POST", f"/api/v1/namespaces/{cluster.namespace}/configmaps", body,
                                   tolerate=(409,)) != 409:
                    return
                continue
            _, obj = found
            try:
                current = json.loads((obj.get("data") or {}).get(KEY) or "{}").get("adapters", [])
            except (ValueError, AttributeError):
                current = []  # not a list kubetune wrote: replaced by one
            new = updated(current if isinstance(current, list) else [], entry, None if added else model, max_loras)
            if new == current:
                return
            patch = {"metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                     "data": {KEY: json.dumps({"adapters": new}, indent=1)}}
            if cluster.request("PATCH", path, patch, tolerate=(409,), content_type=MERGE_PATCH) != 409:
                return
        raise TransientError(f"configmap/{name}: changed by someone else on every try", "try again")
