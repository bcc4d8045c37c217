"""Serving manifests for a trained run: a vLLM Deployment (adapter runs served as LoRA modules, no
merge), a ClusterIP Service, a HorizontalPodAutoscaler on the per-pod queue length
`vllm:num_requests_waiting` (needs a Prometheus adapter: see docs/kubernetes.md) and a
PodDisruptionBudget. The run's files come from its storage: an init container copies them from
object storage into a shared volume; PVC and GCS FUSE runs are mounted."""

from __future__ import annotations

from typing import Any

from kubetune.k8s.render.common import (
    GCS_ROOT, PVC_ROOT, container_security, env, metadata, pod_placement, pod_security, resources, secret_ref, volumes,
)
from kubetune.serve.vllm import VllmTarget, vllm_command
from kubetune.spec.models import RunSpec
from kubetune.storage.store import uri_basename

MODELS = "/models"


def _local_view(uri: str) -> str | None:
    """Where a pvc:// or gs:// URI appears inside the pod (mounted), None for s3/hf."""
    if uri.startswith("pvc://"):
        return f"{PVC_ROOT}/{uri.removeprefix('pvc://')}"
    if uri.startswith("gs://"):
        return f"{GCS_ROOT}/{uri.removeprefix('gs://')}"
    if "://" not in uri:
        return uri
    return None


def serve_objects(spec: RunSpec, run_uri: str | None = None, adapter: bool | None = None,
                  tool_parser: str | None = None, reasoning_parser: str | None = None) -> list[dict[str, Any]]:
    """`adapter`: serve final/adapter on the base (default for lora/qlora) or final/merged (full);
    `tool_parser`, `reasoning_parser`: vLLM's parsers for the run's chat template (kubetune.serve.tool_parser)."""
    run = (run_uri or spec.output_uri).rstrip("/")
    adapter = spec.method.type != "full" if adapter is None else adapter
    name = f"{spec.name}-serve"
    s = spec.serve
    folder = f"{run}/final/{'adapter' if adapter else 'merged'}"
    env_list, env_from = env(spec)
    vols = volumes(spec, None, scratch=False)
    vols.volumes.append({"name": "models", "emptyDir": {}})
    vols.mounts.append({"name": "models", "mountPath": MODELS})
    vols.volumes.append({"name": "scratch", "emptyDir": {}})
    vols.mounts.append({"name": "scratch", "mountPath": "/scratch"})
    fetch: list[str] = []  # object-storage URIs an init container copies to /models before vLLM starts

    def in_pod(uri: str) -> str:
        local = _local_view(uri)
        if local is None:
            fetch.append(uri)
            local = f"{MODELS}/models/{uri_basename(uri)}"  # where `kubetune stage --to /models` puts it
        return local

    local = in_pod(folder)
    if adapter:
        base = spec.model.base
        base_local = base.removeprefix("hf://").split("@")[0] if base.startswith("hf://") else in_pod(base)
        revision = spec.model.revision or (base.split("@", 1)[1] if base.startswith("hf://") and "@" in base else None)
        target = VllmTarget(base_local, uri_basename(base_local), local, ((spec.name, local),), spec.method.lora.r,
                            revision, tool_parser, reasoning_parser)
    else:
        target = VllmTarget(local, spec.name, local, tool_parser=tool_parser, reasoning_parser=reasoning_parser)
    init = [{"name": "fetch-run", "image": spec.kubernetes.image, "imagePullPolicy": spec.kubernetes.image_pull_policy,
             "command": ["kubetune", "stage", *[a for uri in fetch for a in ("--model", uri)], "--to", MODELS],
             "env": env_list, **({"envFrom": env_from} if env_from else {}),
             "resources": resources(spec, cpu="1", memory="2Gi", accelerator=False),
             "securityContext": container_security(), "volumeMounts": vols.mounts}] if fetch else []
    args = vllm_command(target, host="0.0.0.0", port=s.port, max_num_seqs=s.max_concurrency)
    api_env = [{"name": "VLLM_API_KEY", "valueFrom": secret_ref(spec.kubernetes.secrets.api_key)}] \
        if spec.kubernetes.secrets.api_key else []
    probe_path = "/health" if api_env else "/v1/models"
    http = {"port": "http"}
    container = {
        "name": "vllm", "image": s.image, "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": args[:2], "args": args[2:],
        "env": [*env_list, *api_env], **({"envFrom": env_from} if env_from else {}),
        "ports": [{"name": "http", "containerPort": s.port}],
        "resources": resources(spec, devices=1, cpu=s.cpu, memory=s.memory),
        "securityContext": container_security(),
        "startupProbe": {"httpGet": {"path": probe_path, **http}, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {"httpGet": {"path": "/health", **http}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", **http}, "periodSeconds": 15, "failureThreshold": 4},
        "volumeMounts": vols.mounts,
    }
    select = {"kubetune.dev/run": spec.name, "app.kubernetes.io/component": "serve"}
    pod_meta: dict[str, Any] = {"labels": metadata(spec, name, "serve")["labels"]}
    if vols.annotations:
        pod_meta["annotations"] = dict(vols.annotations)
    pod = {"securityContext": pod_security(spec), **pod_placement(spec),
           **({"initContainers": init} if init else {}), "containers": [container], "volumes": vols.volumes}
    replicas = s.autoscaling.min if s.autoscaling else s.replicas
    objects: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(spec, name, "serve"), "spec": {
            "replicas": replicas, "selector": {"matchLabels": select},
            "template": {"metadata": pod_meta, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": metadata(spec, name, "serve"), "spec": {
            "type": "ClusterIP", "selector": select,
            "ports": [{"name": "http", "port": s.port, "targetPort": "http"}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(spec, name, "serve"),
         "spec": {"maxUnavailable": 1, "selector": {"matchLabels": select}}},
    ]
    if s.autoscaling:
        a = s.autoscaling
        objects.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                        "metadata": metadata(spec, name, "serve"), "spec": {
                            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                            "minReplicas": a.min, "maxReplicas": a.max,
                            "metrics": [{"type": "Pods", "pods": {
                                "metric": {"name": "vllm:num_requests_waiting"},
                                "target": {"type": "AverageValue", "averageValue": _quantity(a.target_queue)}}}]}})
    return objects


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"

