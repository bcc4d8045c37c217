"""The autoscaler objects a serving Deployment no longer has: `deploy` applies what it renders, and an
earlier deploy with another `serve.autoscaling.monitoring` (or with autoscaling on) left its own — an HPA
beside a KEDA ScaledObject's would fight it over the replica count. They are removed by name, and only
when kubetune made them (its managed-by label): a team's own object of that name is left alone."""

from __future__ import annotations

from typing import Any

from kubetune.k8s.client import Cluster

# (API group/version, plural, kind) of every object autoscaling_objects() can render
KINDS = (("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
         ("keda.sh/v1alpha1", "scaledobjects", "ScaledObject"),
         ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor"),
         ("monitoring.googleapis.com/v1", "podmonitorings", "PodMonitoring"))


def prune_autoscalers(cluster: Cluster, name: str, rendered: list[dict[str, Any]]) -> list[str]:
    """Delete the autoscaling objects called `name` that `rendered` does not contain; lines to print."""
    kept = {o["kind"] for o in rendered if o["metadata"]["name"] == name}
    said = []
    for api, plural, kind in KINDS:
        if kind in kept:
            continue
        path = f"/apis/{api}/namespaces/{cluster.namespace}/{plural}/{name}"
        found = cluster.request("GET", path, tolerate=(403, 404))  # no such CRD here, or not ours to read
        if isinstance(found, int):
            continue
        labels = (found[1].get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != "kubetune":
            continue
        cluster.request("DELETE", path, tolerate=(404,))
        said.append(f"{kind.lower()}/{name} deleted (no longer part of this Deployment's autoscaling)")
    return said
