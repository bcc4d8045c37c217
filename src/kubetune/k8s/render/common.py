"""What every kubetune pod shares: labels, secure contexts, environment (by reference only),
storage volumes (PVC mounts, GCS FUSE), scratch, /dev/shm and accelerator resources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune import __version__, settings
from kubetune.errors import Problem, SpecError
from kubetune.spec.models import FALLBACK_SCRATCH, RunSpec
from kubetune.uris import bucket, scheme

SPEC_DIR = "/etc/kubetune"
SCRATCH = "/scratch"
PVC_ROOT = "/mnt/pvc"
GCS_ROOT = "/mnt/gcs"
GCS_DRIVER = "gcsfuse.csi.storage.gke.io"
ACCELERATOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "gaudi": "habana.ai/gaudi"}


def labels(spec: RunSpec, component: str, sweep: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/instance": spec.name,
           "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "kubetune",
           "app.kubernetes.io/version": __version__, "kubetune.dev/run": spec.name}
    if sweep:
        out["kubetune.dev/sweep"] = sweep
    return {**out, **spec.kubernetes.labels}


def metadata(spec: RunSpec, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.kubernetes.namespace,
            "labels": {**labels(spec, component, spec_sweep(spec)), **extra_labels}}


def spec_sweep(spec: RunSpec) -> str | None:
    return spec.kubernetes.sweep


AMD_DEVICE_GROUPS = (44, 109)  # video, render (Ubuntu 22.04 nodes): /dev/kfd and /dev/dri/renderD* are theirs


def pod_security(spec: RunSpec) -> dict[str, Any]:
    k = spec.kubernetes
    out: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": k.run_as_user, "runAsGroup": k.run_as_group,
                           "fsGroup": k.fs_group, "seccompProfile": {"type": "RuntimeDefault"}}
    groups = k.device_groups if k.device_groups is not None else (
        list(AMD_DEVICE_GROUPS) if spec.resources.accelerator == "amd" else [])
    if groups:  # a non-root process opens the GPU's device files through these groups
        out["supplementalGroups"] = sorted(set(groups))
    return out


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def uris(spec: RunSpec) -> list[str]:
    return [spec.output_uri, spec.model.base, *([spec.model.adapter] if spec.model.adapter else []),
            *[s.path for s in spec.data.sources()],
            *([spec.data.eval_source().path] if spec.data.eval_source() else [])]


def pvc_claims(spec: RunSpec) -> list[str]:
    return sorted({bucket(u) for u in uris(spec) if scheme(u) == "pvc"})


def gcs_buckets(spec: RunSpec) -> list[str]:
    return sorted({bucket(u) for u in uris(spec) if scheme(u) == "gs"})


def uses_s3(spec: RunSpec) -> bool:
    return any(scheme(u) == "s3" for u in uris(spec))


def secret_ref(ref: str) -> dict[str, Any]:
    name, key = ref.split("/", 1)
    return {"secretKeyRef": {"name": name, "key": key}}


def env(spec: RunSpec, trackers: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, envFrom): paths, storage endpoint, and secrets by reference — never a value. Tracker
    credentials only where training runs (`trackers`)."""
    k = spec.kubernetes
    out: list[dict[str, Any]] = [
        {"name": "HOME", "value": f"{SCRATCH}/home"},
        {"name": settings.WORKDIR, "value": f"{SCRATCH}/work"},
        {"name": settings.CACHE, "value": f"{SCRATCH}/cache"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH}/matplotlib"},
        {"name": settings.PVC_ROOT, "value": PVC_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if gcs_buckets(spec):
        out.append({"name": settings.GCS_MOUNT, "value": GCS_ROOT})
    if spec.storage.endpoint_url:
        out.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint_url})
    if spec.storage.region:
        out.append({"name": "AWS_DEFAULT_REGION", "value": spec.storage.region})
    if k.secrets.hf_token:
        out.append({"name": "HF_TOKEN", "valueFrom": secret_ref(k.secrets.hf_token)})
    if trackers and k.secrets.wandb:
        out.append({"name": "WANDB_API_KEY", "valueFrom": secret_ref(k.secrets.wandb)})
    for name, judge in spec.method.grpo.endpoints().items() if trackers else ():  # graders' judges, embeddings
        if judge.api_key_env and not judge.api_key_secret:
            raise SpecError([Problem(f"method.grpo.{name}.api_key_secret", f"the endpoint's key "
                                     f"({judge.api_key_env}) has no Secret to come from in the pod")],
                            "name the Kubernetes Secret holding it: api_key_secret: SECRET/KEY")
        if judge.api_key_env and judge.api_key_secret:
            out.append({"name": judge.api_key_env, "valueFrom": secret_ref(judge.api_key_secret)})
    env_from = [{"secretRef": {"name": name}} for name in (k.secrets.storage, k.secrets.mlflow if trackers else None)
                if name]
    return with_env(out, {}, k.env), env_from


# transformers' Intel Gaudi page (huggingface.co/docs/transformers/perf_train_gaudi): its modeling code is not all
# written for HPU lazy mode (the images' default): eager mode, and int64 support against long-integer casts.
GAUDI_TRAINING_ENV = {"PT_HPU_LAZY_MODE": "0", "PT_ENABLE_INT64_SUPPORT": "1"}


def with_env(out: list[dict[str, Any]], defaults: dict[str, str], chosen: dict[str, str]) -> list[dict[str, Any]]:
    """`out` with `defaults` added and the spec's own `kubernetes.env` over both (one entry per name)."""
    values = {**defaults, **chosen}
    kept = [e for e in out if e["name"] not in values]
    return kept + [{"name": k, "value": v} for k, v in values.items()]


@dataclass
class Volumes:
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)


def volumes(spec: RunSpec, config_map: str | None, scratch: bool = True) -> Volumes:
    k = spec.kubernetes
    v = Volumes()
    if config_map:
        v.volumes.append({"name": "spec", "configMap": {"name": config_map}})
        v.mounts.append({"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})
    v.volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}})
    v.mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    v.volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": k.tmp_size}})
    v.mounts.append({"name": "tmp", "mountPath": "/tmp"})
    if scratch:
        size = FALLBACK_SCRATCH if k.scratch_size == "auto" else k.scratch_size  # the edge sizes auto (k8s/storage.py)
        claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
        if k.storage_class:
            claim["storageClassName"] = k.storage_class
        v.volumes.append({"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}})
        v.mounts.append({"name": "scratch", "mountPath": SCRATCH})
    for i, claim_name in enumerate(pvc_claims(spec)):
        v.volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim_name}})
        v.mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim_name}"})
    for i, bucket in enumerate(gcs_buckets(spec)):
        v.volumes.append({"name": f"gcs-{i}", "csi": {"driver": GCS_DRIVER, "volumeAttributes": {
            "bucketName": bucket, "mountOptions": "implicit-dirs"}}})
        v.mounts.append({"name": f"gcs-{i}", "mountPath": f"{GCS_ROOT}/{bucket}"})
        v.annotations["gke-gcsfuse/volumes"] = "true"
    return v


LOGS = "1Gi"  # a container's logs and writable layer (the root filesystem itself is read-only)
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def quantity_bytes(quantity: str) -> float:
    """A Kubernetes quantity (4Gi, 500Mi, 60G) in bytes."""
    number = quantity.rstrip("KiMGTk")
    return float(number) * _UNITS[quantity[len(number):]]


def quantity_sum(*quantities: str) -> str:
    """Kubernetes quantities added up, in Mi (rounded up)."""
    total = sum(quantity_bytes(q) for q in quantities)
    return f"{-(-int(total) // 2**20)}Mi"


def node_disk(spec: RunSpec, *volumes: str) -> str:
    """The ephemeral-storage a pod asks for: its node-local volumes (/tmp and `volumes`) and its logs.
    GKE Autopilot sets a small default otherwise, and the kubelet evicts a pod that writes past it."""
    return quantity_sum(spec.kubernetes.tmp_size, LOGS, *volumes)


def resources(spec: RunSpec, devices: int | None = None, cpu: str | None = None, memory: str | None = None,
              accelerator: bool = True, disk: str | None = None) -> dict[str, Any]:
    """requests == limits: a training pod is not a burstable workload, and device counts must match."""
    r = spec.resources
    amount = {"cpu": cpu or r.cpu or "4", "memory": memory or r.memory or "16Gi",
              "ephemeral-storage": disk or node_disk(spec)}
    kind = r.accelerator
    if accelerator and kind in ACCELERATOR_RESOURCE:
        amount[ACCELERATOR_RESOURCE[kind]] = str(devices or r.devices_per_node)
        if kind == "gaudi":
            amount["hugepages-2Mi"] = spec.kubernetes.hugepages
    return {"requests": dict(amount), "limits": dict(amount)}


def pod_placement(spec: RunSpec) -> dict[str, Any]:
    k = spec.kubernetes
    out: dict[str, Any] = {}
    if k.service_account:
        out["serviceAccountName"] = k.service_account
    if k.priority_class:
        out["priorityClassName"] = k.priority_class
    if k.node_selector:
        out["nodeSelector"] = dict(sorted(k.node_selector.items()))
    if k.tolerations:
        out["tolerations"] = [_toleration(t) for t in k.tolerations]
    return out


def _toleration(t: Any) -> dict[str, Any]:
    out = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
           "tolerationSeconds": t.toleration_seconds}
    return {k: v for k, v in out.items() if v is not None}


def queue_labels(spec: RunSpec) -> dict[str, str]:
    return {"kueue.x-k8s.io/queue-name": spec.kubernetes.queue} if spec.kubernetes.queue else {}
