"""The Prometheus Adapter's rule for a serving HPA, delivered the way the adapter loads it.

The adapter reads one config file (`config.yaml` of its ConfigMap, the Helm chart's
`prometheus-adapter`), only at start: a rule in a ConfigMap of its own is never read. So `deploy`
adds kubetune's rule to that ConfigMap (once: a rule already serving the series is left alone), on
the version it read (a concurrent change is a conflict, not a lost update), then restarts the adapter
by changing its pod template. `kubetune setup` grants exactly these two objects in the adapter's
namespace (setup.metrics_rules_role).
"""

from __future__ import annotations

import hashlib

import yaml

from kubetune.errors import UsageError
from kubetune.k8s.client import Cluster
from kubetune.k8s.render.serve import adapter_rule
from kubetune.spec.models import RunSpec

MERGE = "application/merge-patch+json"
RESTARTED = "kubetune.dev/adapter-rules"  # pod-template annotation: its change rolls the adapter's pods


def add_adapter_rule(cluster: Cluster, spec: RunSpec) -> str:
    """Make the adapter serve the spec's series; a line that says what was done."""
    a = spec.serve.autoscaling
    assert a is not None and a.monitoring == "servicemonitor"
    where = f"{a.adapter_namespace}/{a.adapter_config}"
    path = f"/api/v1/namespaces/{a.adapter_namespace}/configmaps/{a.adapter_config}"
    found = cluster.request("GET", path, tolerate=(403, 404))
    if found == 404:
        raise UsageError(f"serve.autoscaling.adapter_config: ConfigMap {where} does not exist, so no Prometheus Adapter "
                         "is configured there to serve the HPA's metric",
                         "install it (helm install prometheus-adapter prometheus-community/prometheus-adapter -n "
                         f"{a.adapter_namespace}), set adapter_namespace/adapter_config to yours, or use "
                         "serve.autoscaling.monitoring: keda")
    if found == 403:
        raise UsageError(f"not allowed to read ConfigMap {where} (the Prometheus Adapter's rules)",
                         "an admin runs `kubetune setup SPEC` with you in kubernetes.operators: it grants this "
                         "ConfigMap and the adapter's Deployment, nothing else in that namespace")
    _, configmap = found
    data = configmap.get("data") or {}
    try:
        config = yaml.safe_load(data.get("config.yaml") or "") or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"ConfigMap {where}: config.yaml is not YAML ({exc.__class__.__name__}); kubetune leaves it "
                         "alone", "fix the adapter's config, then deploy again") from None
    if not isinstance(config, dict) or not isinstance(config.get("rules", []), list):
        raise UsageError(f"ConfigMap {where}: config.yaml has no list of rules; kubetune leaves it alone",
                         "fix the adapter's config, then deploy again")
    rule = adapter_rule(spec)
    series = rule["name"]["as"]
    rules = config.setdefault("rules", [])
    if any(isinstance(r, dict) and (r.get("name") or {}).get("as") == series for r in rules):
        return f"Prometheus Adapter {where}: already serves {series}"
    rules.append(rule)
    text = yaml.safe_dump(config, sort_keys=False)
    patch = {"metadata": {"resourceVersion": configmap["metadata"]["resourceVersion"]}, "data": {"config.yaml": text}}
    if cluster.request("PATCH", path, patch, tolerate=(409,), content_type=MERGE) == 409:
        raise UsageError(f"ConfigMap {where} changed while kubetune added its rule; nothing was overwritten",
                         "deploy again")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    restart = {"spec": {"template": {"metadata": {"annotations": {RESTARTED: digest}}}}}
    moved = cluster.request("PATCH", f"/apis/apps/v1/namespaces/{a.adapter_namespace}/deployments/"
                            f"{a.adapter_deployment}", restart, tolerate=(404,), content_type=MERGE)
    if moved == 404:
        return (f"Prometheus Adapter {where}: rule for {series} added; Deployment {a.adapter_deployment} not found, "
                "restart the adapter yourself (it reads its rules only at start)")
    return f"Prometheus Adapter {where}: rule for {series} added, Deployment {a.adapter_deployment} restarted"
