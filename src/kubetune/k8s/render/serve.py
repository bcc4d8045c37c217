"""Serving manifests: one vLLM Deployment per base model — a whole model, or the adapters of one or
many runs of a base as LoRA modules (no merge), each under its run name — with a ClusterIP Service,
a PodDisruptionBudget, an autoscaler on a per-pod vLLM metric, and what makes that metric exist (a
ServiceMonitor and a KEDA ScaledObject; a ServiceMonitor and an HPA served by the Prometheus Adapter,
whose rule `deploy` adds to the adapter's config; or a GKE PodMonitoring and an HPA). The runs'
files come from their storage: init containers copy them from object storage into a shared volume;
PVC and GCS FUSE runs are mounted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


from kubetune.runs.layout import RUN_KEYS, serves_merged
from kubetune.errors import UsageError
from kubetune import settings
from kubetune.k8s.render.common import (
    GCS_ROOT, PVC_ROOT, container_security, env, metadata, node_disk, pod_placement, pod_security, resources,
    secret_ref, volumes,
)
from kubetune.serve.vllm import VllmTarget, vllm_command
from kubetune.k8s.render.image import add_dist, image, kubetune_command, scratch_size, serving_image
from kubetune.spec.models import FALLBACK_MODEL_STORAGE, RunSpec
from kubetune.uris import body, has_scheme, hub_ref, is_hub, scheme, uri_basename

MODELS = "/models"
# serve.autoscaling.metric → the per-pod vLLM series (v0.11 names: kv_cache_usage_perc replaced gpu_cache_usage_perc)
METRICS = {"queue": "vllm:num_requests_waiting", "batch": "vllm:num_requests_running",
           "kv_cache": "vllm:kv_cache_usage_perc"}


def _local_view(uri: str) -> str | None:
    """Where a pvc:// or gs:// URI appears inside the pod (mounted), None for s3/hf."""
    if scheme(uri) == "pvc":
        return f"{PVC_ROOT}/{body(uri)}"
    if scheme(uri) == "gs":
        return f"{GCS_ROOT}/{body(uri)}"
    if not has_scheme(uri):
        return uri
    return None


@dataclass(frozen=True)
class Served:
    """One model a serving Deployment answers for: a run's adapter (on its base), or a whole model (a
    merged run, a model folder, or a Hub model)."""

    name: str                      # the model name clients ask for
    uri: str                       # adapter folder, whole-model folder, or hf://org/name
    rank: int | None = None        # LoRA rank of an adapter
    base: str | None = None        # the adapter's base model URI; None: `uri` is a whole model
    revision: str | None = None    # Hub revision of the base (or of a Hub model)


def served_run(spec: RunSpec, run_uri: str | None = None) -> Served:
    """What a run serves, from its resolved spec (runs.layout.serves_merged, the rule local serving
    follows too): final/adapter on its base (lora, qlora) or final/merged (full)."""
    run = (run_uri or spec.output_uri).rstrip("/")
    if serves_merged(spec):
        return Served(spec.name, f"{run}/{RUN_KEYS.served(spec)}")
    base = spec.model.base
    revision = hub_ref(base, spec.model.revision)[1] if is_hub(base) else spec.model.revision
    return Served(spec.name, f"{run}/{RUN_KEYS.served(spec)}", spec.method.lora.r, base, revision)


def check_served(served: Sequence[Served]) -> None:
    """One Deployment serves one base model: one whole model, or adapters of one base."""
    if not served:
        raise UsageError("nothing to serve", "pass --run URI (a run, a model folder or hf://org/name)")
    names = [s.name for s in served]
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"two served models are both named {', '.join(dup)}", "serve runs with different names")
    bases = {s.base for s in served if s.base}
    whole = [s for s in served if s.base is None]
    if len(bases) > 1 or (whole and (bases or len(whole) > 1)):
        raise UsageError("one Deployment serves one base model: a whole model, or LoRA adapters of one base; got "
                         + ", ".join(f"{s.name} ({'on ' + s.base if s.base else 'whole model'})" for s in served),
                         "deploy the others with their own spec or --run")


def serve_objects(spec: RunSpec, served: Sequence[Served] | None = None, tool_parser: str | None = None,
                  reasoning_parser: str | None = None) -> list[dict[str, Any]]:
    """A vLLM Deployment for `served` (default: the spec's own run), with a Service, a PDB, an HPA on
    the chosen vLLM metric and, if asked, what makes Prometheus scrape it; `tool_parser`,
    `reasoning_parser`: vLLM's parsers for the run's chat template (kubetune.serve.tool_parser)."""
    served = list(served or [served_run(spec)])
    check_served(served)
    name = f"{spec.name}-serve"
    s = spec.serve
    env_list, env_from = env(spec)
    # The download cache and the Hub's cache live on the models volume: staged models are hard links
    # into it, so each file is on the node's disk once (not once in a cache and again in /models).
    caches = {settings.CACHE: f"{MODELS}/.cache", "HF_HOME": f"{MODELS}/.hf"}
    env_list = [{**e, "value": caches[e["name"]]} if e["name"] in caches else e for e in env_list]
    vols = add_dist(spec, volumes(spec, None, scratch=False), name)
    models = FALLBACK_MODEL_STORAGE if s.model_storage == "auto" else s.model_storage  # sized at the edge
    vols.volumes.append({"name": "models", "emptyDir": {"sizeLimit": models}})
    vols.mounts.append({"name": "models", "mountPath": MODELS})
    scratch = scratch_size(spec, SERVE_SCRATCH)  # kubetune installed at start by the init containers lives here
    vols.volumes.append({"name": "scratch", "emptyDir": {"sizeLimit": scratch}})
    vols.mounts.append({"name": "scratch", "mountPath": "/scratch"})
    disk = node_disk(spec, models, scratch)
    fetch: dict[str, list[str]] = {}  # where under /models → object-storage URIs an init container copies there
    several = len(served) > 1

    def in_pod(uri: str, owner: str) -> str:
        local = _local_view(uri)
        if local is None:
            root = f"{MODELS}/{owner}" if several else MODELS  # adapters are all called "adapter": one root each
            fetch.setdefault(root, []).append(uri)
            local = f"{root}/models/{uri_basename(uri)}"  # where `kubetune stage --to ROOT` puts it
        return local

    def hub_or_pod(uri: str, owner: str) -> str:
        return hub_ref(uri)[0] if is_hub(uri) else in_pod(uri, owner)

    adapters = [x for x in served if x.base]
    if adapters:
        base = adapters[0].base
        assert base is not None
        base_local = hub_or_pod(base, "base")
        modules = tuple((a.name, in_pod(a.uri, a.name)) for a in adapters)
        rank = max([a.rank or 8 for a in adapters] + ([s.max_lora_rank] if s.runtime_adapters else []))
        loras = max(len(modules), s.max_loras) if s.runtime_adapters else len(modules)
        target = VllmTarget(base_local, uri_basename(base_local), modules[0][1], modules, rank, adapters[0].revision,
                            tool_parser, reasoning_parser, max_loras=loras if loras > 1 else None,
                            runtime_adapters=s.runtime_adapters)
    else:
        (model,) = served
        local = hub_or_pod(model.uri, model.name)
        target = VllmTarget(local, model.name, local, revision=model.revision if is_hub(model.uri) else None,
                            tool_parser=tool_parser, reasoning_parser=reasoning_parser,
                            max_lora_rank=s.max_lora_rank if s.runtime_adapters else None,
                            max_loras=s.max_loras if s.runtime_adapters else None, runtime_adapters=s.runtime_adapters)
    init = [{"name": _init_name(root, several), "image": image(spec),
             "imagePullPolicy": spec.kubernetes.image_pull_policy,
             "command": kubetune_command(spec, "stage", *[a for uri in uris for a in ("--model", uri)], "--to", root),
             "env": env_list, **({"envFrom": env_from} if env_from else {}),
             "resources": resources(spec, cpu="1", memory="2Gi", accelerator=False, disk=disk),
             "securityContext": container_security(), "volumeMounts": vols.mounts} for root, uris in fetch.items()]
    args = vllm_command(target, host="0.0.0.0", port=s.port, max_num_seqs=s.max_concurrency,
                        extra=memory_fraction_args(spec))
    api_env = [{"name": "VLLM_API_KEY", "valueFrom": secret_ref(spec.kubernetes.secrets.api_key)}] \
        if spec.kubernetes.secrets.api_key else []
    probe_path = "/health" if api_env else "/v1/models"
    http = {"port": "http"}
    container = {
        "name": "vllm", "image": serving_image(spec), "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": args[:2], "args": args[2:],
        "env": [*env_list, *api_env, *_device_env(spec)], **({"envFrom": env_from} if env_from else {}),
        "ports": [{"name": "http", "containerPort": s.port}],
        "resources": _serving_resources(spec, disk),
        "securityContext": container_security(),
        "startupProbe": {"httpGet": {"path": probe_path, **http}, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {"httpGet": {"path": "/health", **http}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", **http}, "periodSeconds": 15, "failureThreshold": 4},
        "volumeMounts": vols.mounts,
    }
    containers = [container]
    extra: list[dict[str, Any]] = []
    if s.runtime_adapters:
        containers, extra = _runtime_adapters(spec, name, container, vols, env_list, env_from, api_env, disk)
    select = {"kubetune.dev/run": spec.name, "app.kubernetes.io/component": "serve"}
    pod_meta: dict[str, Any] = {"labels": metadata(spec, name, "serve")["labels"]}
    if vols.annotations:
        pod_meta["annotations"] = dict(vols.annotations)
    placement = pod_placement(spec)
    sharing = gpu_sharing_selector(spec)
    if sharing:
        placement["nodeSelector"] = dict(sorted({**placement.get("nodeSelector", {}), **sharing}.items()))
    pod = {"securityContext": pod_security(spec), **placement,
           **({"initContainers": init} if init else {}), "containers": containers, "volumes": vols.volumes}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(spec, name, "serve"), "spec": {
            # with an HPA, replicas are the HPA's: applying a count would take the field back from it
            **({} if s.autoscaling else {"replicas": s.replicas}), "selector": {"matchLabels": select},
            "template": {"metadata": pod_meta, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": metadata(spec, name, "serve"), "spec": {
            "type": "ClusterIP", "selector": select,
            "ports": [{"name": "http", "port": s.port, "targetPort": "http"}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(spec, name, "serve"),
         "spec": {"maxUnavailable": 1, "selector": {"matchLabels": select}}},
    ]
    if s.autoscaling:
        objects += autoscaling_objects(spec, name, select)
    return objects + extra


def _device_env(spec: RunSpec) -> list[dict[str, str]]:
    """Gaudi: tensor-parallel serving with HPU graphs needs lazy collectives (vLLM Hardware Plugin for Intel
    Gaudi, "Environment variables"); harmless on one card."""
    if spec.resources.accelerator == "gaudi":
        return [{"name": "PT_HPU_ENABLE_LAZY_COLLECTIVES", "value": "true"}]
    return []


ADAPTER_LIST = "/etc/kubetune/adapters"


def _runtime_adapters(spec: RunSpec, name: str, vllm: dict[str, Any], vols: Any, env_list: list[dict[str, Any]],
                      env_from: list[dict[str, Any]], api_env: list[dict[str, Any]], disk: str
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """vLLM with runtime LoRA updating, and its sidecar: `kubetune serve-adapters` reads the ConfigMap
    NAME-adapters (written by `kubetune server`, so rendered without data: applying this again keeps
    its list) and loads and unloads adapters through vLLM's API, fetching them with the pod's
    credentials onto the models volume."""
    listing = f"{name}-adapters"
    vllm["env"] = [*vllm["env"], {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]
    vols.volumes.append({"name": "adapter-list", "configMap": {"name": listing, "optional": True}})
    sidecar = {
        "name": "adapters", "image": image(spec), "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": kubetune_command(spec, "serve-adapters", "--file", f"{ADAPTER_LIST}/adapters.json",
                                    "--vllm", f"http://127.0.0.1:{spec.serve.port}"),
        "env": [*env_list, *api_env], **({"envFrom": env_from} if env_from else {}),
        "resources": resources(spec, cpu="500m", memory="1Gi", accelerator=False, disk=disk),
        "securityContext": container_security(),
        "volumeMounts": [*vols.mounts, {"name": "adapter-list", "mountPath": ADAPTER_LIST, "readOnly": True}],
    }
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, listing, "serve")}
    return [vllm, sidecar], [configmap]


def autoscaling_objects(spec: RunSpec, name: str, select: dict[str, str]) -> list[dict[str, Any]]:
    """The autoscaler on the chosen per-pod vLLM metric (scale-down only after it stayed low for a
    while), and what makes the metric exist on a fresh cluster: keda, a ServiceMonitor and a ScaledObject
    whose Prometheus trigger KEDA evaluates itself (KEDA makes and owns the HPA); servicemonitor, a
    ServiceMonitor and an HPA on the custom metrics API, served by the Prometheus Adapter once
    `deploy` has added `adapter_rule` to its config; podmonitoring, a PodMonitoring and an HPA on the
    name GKE's custom-metrics adapter serves Managed Prometheus samples under."""
    a = spec.serve.autoscaling
    assert a is not None
    series = METRICS[a.metric]
    target = a.target or a.target_queue or {"queue": 5.0, "batch": max(1.0, 0.75 * spec.serve.max_concurrency),
                                            "kv_cache": 0.8}[a.metric]
    behavior = {"scaleDown": {"stabilizationWindowSeconds": a.scale_down_seconds,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}}
    scrape = {"port": "http", "path": "/metrics", "interval": "15s"}
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": metadata(spec, name, "serve"),
               "spec": {"selector": {"matchLabels": select}, "namespaceSelector": {
                   "matchNames": [spec.kubernetes.namespace]}, "endpoints": [scrape]}}
    if a.monitoring == "keda":
        # AverageValue: KEDA's HPA divides the query's value (the sum over the Deployment's pods) by the
        # replicas, so the threshold is per pod as the HPA's target is. The series are selected by the
        # `service` label prometheus-operator puts on what a ServiceMonitor scrapes: this Deployment's
        # Service (pod names are cut short for long names, a pod-name regex would match nothing).
        query = f'sum({series}{{namespace="{spec.kubernetes.namespace}",service="{name}"}})'
        return [monitor, {
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": metadata(spec, name, "serve"),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicaCount": a.min, "maxReplicaCount": a.max, "pollingInterval": 15,
                     "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
                     "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                         "serverAddress": a.prometheus_url, "query": query, "threshold": _number(target)}}]}}]
    # GKE's adapter names Managed Prometheus series prometheus.googleapis.com|NAME|gauge
    metric = f"prometheus.googleapis.com|{series}|gauge" if a.monitoring == "podmonitoring" else series
    out: list[dict[str, Any]] = [{
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata(spec, name, "serve"),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                 "minReplicas": a.min, "maxReplicas": a.max,
                 "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                       "target": {"type": "AverageValue",
                                                                  "averageValue": _quantity(target)}}}],
                 "behavior": behavior}}]
    if a.monitoring == "servicemonitor":
        out.append(monitor)
    elif a.monitoring == "podmonitoring":
        out.append({"apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring",
                    "metadata": metadata(spec, name, "serve"),
                    "spec": {"selector": {"matchLabels": select}, "endpoints": [{"port": "http", "path": "/metrics",
                                                                                 "interval": "15s"}]}})
    return out


SERVE_SCRATCH = "1Gi"  # HOME and small caches of the serving pod; models and their caches are on /models
VLLM_MEMORY_FRACTION = 0.9  # vLLM's own default for a GPU it has alone


def memory_fraction_args(spec: RunSpec) -> tuple[str, ...]:
    """vLLM claims --gpu-memory-utilization of the whole GPU it sees (0.9 by default). Pods time-sharing
    or MPS-sharing one GPU each see all of it: each takes its share, or the second pod fails to start
    (not enough free memory). A MIG slice is the pod's own: the default fits it."""
    s = spec.serve
    if s.gpu_sharing in ("time_sharing", "mps"):
        return ("--gpu-memory-utilization", f"{VLLM_MEMORY_FRACTION / s.gpu_clients:.3f}")
    return ()


def gpu_sharing_selector(spec: RunSpec) -> dict[str, str]:
    """GKE's node labels for shared GPUs (on GKE: a cloud.google.com/ node selector in the spec)."""
    sharing, s = spec.serve.gpu_sharing, spec.serve
    if sharing == "none" or not _on_gke(spec):
        return {}
    if sharing.startswith("mig:"):
        return {"cloud.google.com/gke-gpu-partition-size": sharing.removeprefix("mig:")}
    return {"cloud.google.com/gke-gpu-sharing-strategy": sharing.replace("_", "-"),
            "cloud.google.com/gke-max-shared-clients-per-gpu": str(s.gpu_clients)}


def _serving_resources(spec: RunSpec, disk: str) -> dict[str, Any]:
    """One GPU (or one shared slice of it). Off GKE, a MIG slice is the NVIDIA device plugin's resource
    (mixed strategy: nvidia.com/mig-PROFILE); time-slicing and MPS are set on the plugin and the pod
    still asks for one nvidia.com/gpu."""
    s = spec.serve
    out = resources(spec, devices=1, cpu=s.cpu, memory=s.memory, disk=disk)
    if s.gpu_sharing.startswith("mig:") and not _on_gke(spec) and "nvidia.com/gpu" in out["limits"]:
        for part in ("requests", "limits"):
            del out[part]["nvidia.com/gpu"]
            out[part][f"nvidia.com/mig-{s.gpu_sharing.removeprefix('mig:')}"] = "1"
    return out


def _on_gke(spec: RunSpec) -> bool:
    return any(k.startswith("cloud.google.com/") for k in spec.kubernetes.node_selector)


def _init_name(root: str, several: bool) -> str:
    return f"fetch-{root.rsplit('/', 1)[1]}"[:63] if several else "fetch-run"


def adapter_rule(spec: RunSpec) -> dict[str, Any]:
    """The Prometheus Adapter rule that serves the HPA's per-pod series on the custom metrics API under
    the name the HPA asks for (`deploy` adds it to the adapter's config)."""
    assert spec.serve.autoscaling is not None
    series = METRICS[spec.serve.autoscaling.metric]
    return {"seriesQuery": f'{series}{{namespace!="",pod!=""}}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"as": series}, "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"

