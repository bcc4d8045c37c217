"""What a cluster needs before the first submit, rendered from the spec (`kubetune render --what
setup`, applied by `kubetune setup`): the namespace; the pods' service account bound to its cloud
identity (GKE Workload Identity, EKS IRSA); a Role with exactly the verbs kubetune uses and its
RoleBinding; the Kueue LocalQueue; and Secrets with empty placeholders for every secret the spec
references — never a value (`kubetune setup` creates a Secret only where none exists)."""

from __future__ import annotations

from typing import Any

from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec

ROLE = "kubetune"
LABELS = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/component": "setup"}
# (apiGroup, resources, verbs): every call the CLI makes (apply = patch, plus create for new objects)
RULES: list[tuple[str, list[str], list[str]]] = [
    ("batch", ["jobs"], ["get", "list", "watch", "create", "patch", "delete"]),
    ("", ["configmaps", "services"], ["get", "list", "create", "patch", "delete"]),
    ("", ["pods"], ["get", "list", "watch", "create", "delete"]),  # create: doctor's probe, copy's data-access pod
    ("", ["pods/log"], ["get"]),
    ("", ["pods/proxy"], ["get", "update"]),  # kubetune copy: its data-access pod's files (GET, PUT)
    ("", ["secrets"], ["create", "delete"]),  # kubetune copy: the copy's one-time token (never read back)
    ("apps", ["deployments"], ["get", "list", "create", "patch", "delete"]),
    ("autoscaling", ["horizontalpodautoscalers"], ["get", "list", "create", "patch", "delete"]),
    ("policy", ["poddisruptionbudgets"], ["get", "list", "create", "patch", "delete"]),
    ("monitoring.coreos.com", ["servicemonitors"], ["get", "create", "patch", "delete"]),
    ("monitoring.googleapis.com", ["podmonitorings"], ["get", "create", "patch", "delete"]),
    ("keda.sh", ["scaledobjects"], ["get", "create", "patch", "delete"]),
    ("kueue.x-k8s.io", ["localqueues"], ["get", "list"]),
]
# the cloud identity annotation a service account carries, by the identity's shape
GKE_IDENTITY = "iam.gke.io/gcp-service-account"
EKS_IDENTITY = "eks.amazonaws.com/role-arn"


def role_rules() -> list[dict[str, Any]]:
    return [{"apiGroups": [group], "resources": list(res), "verbs": list(verbs)} for group, res, verbs in RULES]


def secret_keys(spec: RunSpec) -> dict[str, list[str]]:
    """Secret name → the keys the rendered pods read from it."""
    s = spec.kubernetes.secrets
    out: dict[str, list[str]] = {}
    for ref in (s.hf_token, s.api_key, s.wandb):
        if ref:
            name, key = ref.split("/", 1)
            out.setdefault(name, []).append(key)
    if s.storage:
        out.setdefault(s.storage, []).extend(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    if s.mlflow:
        out.setdefault(s.mlflow, []).extend(["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"])
    return {name: sorted(set(keys)) for name, keys in sorted(out.items())}


def setup_objects(spec: RunSpec) -> list[dict[str, Any]]:
    k = spec.kubernetes
    ns = k.namespace
    if k.queue and not k.cluster_queue:
        raise UsageError(f"kubernetes.cluster_queue: the LocalQueue {k.queue} must point at a ClusterQueue",
                         "name the ClusterQueue your cluster admin created (kubectl get clusterqueues)")

    def meta(name: str) -> dict[str, Any]:  # shared by every run of the namespace: no run labels
        return {"name": name, "namespace": ns, "labels": dict(LABELS)}

    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": ns, "labels": dict(LABELS)}}]
    if k.service_account:
        account: dict[str, Any] = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(k.service_account)}
        if k.cloud_identity:
            key = EKS_IDENTITY if k.cloud_identity.startswith("arn:") else GKE_IDENTITY
            account["metadata"]["annotations"] = {key: k.cloud_identity}
        objects.append(account)
    objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(ROLE),
                    "rules": role_rules()})
    if k.operators:
        objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(ROLE),
                        "subjects": [_subject(who, ns) for who in k.operators],
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE}})
    if k.queue:
        objects.append({"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": meta(k.queue),
                        "spec": {"clusterQueue": k.cluster_queue}})
    objects += metrics_rules_role(spec)
    for name, keys in secret_keys(spec).items():
        secret = meta(name)
        secret["annotations"] = {"kubetune.dev/placeholder": "true"}
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": secret, "type": "Opaque",
                        "stringData": {key: "" for key in keys}})
    return objects


METRICS_ROLE = "kubetune-adapter-rules"


def metrics_rules_role(spec: RunSpec) -> list[dict[str, Any]]:
    """(servicemonitor) In the Prometheus Adapter's namespace: read and patch its rules ConfigMap and
    its Deployment (to restart it), those two objects by name and nothing else there."""
    a, k = spec.serve.autoscaling, spec.kubernetes
    if a is None or a.monitoring != "servicemonitor":
        return []
    meta = {"name": METRICS_ROLE, "namespace": a.adapter_namespace, "labels": dict(LABELS)}
    out: list[dict[str, Any]] = [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
                                  "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                                             "resourceNames": [a.adapter_config], "verbs": ["get", "patch"]},
                                            {"apiGroups": ["apps"], "resources": ["deployments"],
                                             "resourceNames": [a.adapter_deployment], "verbs": ["get", "patch"]}]}]
    if k.operators:
        out.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
                    "subjects": [_subject(who, k.namespace) for who in k.operators],
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": METRICS_ROLE}})
    return out


def _subject(who: str, ns: str) -> dict[str, Any]:
    """kubernetes.operators entries: a user name, group:NAME, or serviceaccount:[NAMESPACE/]NAME."""
    kind, _, name = who.partition(":") if ":" in who and who.split(":", 1)[0] in ("group", "serviceaccount", "user") \
        else ("user", "", who)
    if kind == "serviceaccount":
        where, _, account = name.rpartition("/")
        return {"kind": "ServiceAccount", "name": account, "namespace": where or ns}
    return {"kind": kind.capitalize(), "name": name, "apiGroup": "rbac.authorization.k8s.io"}
