"""Training (and stage) manifests: a ConfigMap with the resolved spec and a batch/v1 Job that runs
`kubetune train` on it — the same code path as a local run.

One node: a Job. Several: an Indexed Job (completions = parallelism = nodes) plus a headless
Service, torchrun's c10d rendezvous on the stable hostname of index 0. The podFailurePolicy fails
the Job at once on a configuration error (exit 2) and does not count disruptions (preemption,
eviction, node drain) against backoffLimit; any other failure is retried, and with the output in
object storage or a PVC every retry resumes from the newest complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune import settings
from kubetune.errors import EXIT_TRANSIENT, EXIT_USAGE, UsageError
from kubetune.k8s.render.common import (
    GAUDI_TRAINING_ENV, SCRATCH, SPEC_DIR, container_security, env, metadata, pod_placement, pod_security, queue_labels,
    resources, volumes, with_env,
)
from kubetune.k8s.render.image import add_dist, image, kubetune_command
from kubetune.spec.load import spec_to_yaml
from kubetune.spec.models import RunSpec

RDZV_PORT = 29500


def config_map(spec: RunSpec, component: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{spec.name}-spec", component),
            "data": {"spec.yaml": spec_to_yaml(spec)}}


def _failure_policy(container: str) -> dict[str, Any]:
    """errors.py's exit codes, acted on: 2 (fix your input) fails the Job at once; 75 (storage, Hub or
    API unreachable) and 1 are retried within backoffLimit; a disrupted pod (preemption, eviction,
    drain) is retried without counting. Every retry resumes from the newest complete checkpoint."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [EXIT_USAGE]}},
        {"action": "Count", "onExitCodes": {"containerName": container, "operator": "In", "values": [EXIT_TRANSIENT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _job(spec: RunSpec, name: str, component: str, container: dict[str, Any], vols: Any, *, completions: int = 1,
         indexed: bool = False, backoff: int | None = None, subdomain: str | None = None) -> dict[str, Any]:
    pod_meta: dict[str, Any] = {"labels": metadata(spec, name, component)["labels"]}
    if vols.annotations:
        pod_meta["annotations"] = dict(vols.annotations)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are new pods that resume
        "terminationGracePeriodSeconds": spec.kubernetes.termination_grace_seconds,
        "securityContext": pod_security(spec),
        **pod_placement(spec),
        "containers": [container],
        "volumes": vols.volumes,
    }
    if subdomain:
        pod["subdomain"] = subdomain
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff if backoff is not None else spec.kubernetes.backoff_limit,
        "completions": completions, "parallelism": completions,
        "podFailurePolicy": _failure_policy(container["name"]),
        # a replacement pod starts only once the old one has terminated: never two writers of one run
        "podReplacementPolicy": "Failed",
        "template": {"metadata": pod_meta, "spec": pod},
    }
    if indexed:
        job_spec["completionMode"] = "Indexed"
    if spec.kubernetes.queue:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) it when the queue has quota
    meta = metadata(spec, name, component, **queue_labels(spec))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def train_objects(spec: RunSpec) -> list[dict[str, Any]]:
    nodes = spec.resources.nodes
    env_list, env_from = env(spec, trackers=True)
    if spec.resources.accelerator == "gaudi":
        env_list = with_env(env_list, GAUDI_TRAINING_ENV, spec.kubernetes.env)
    vols = add_dist(spec, volumes(spec, f"{spec.name}-spec"), spec.name)
    if nodes > 1:
        env_list.append({"name": settings.RDZV_ENDPOINT,
                         "value": f"{spec.name}-0.{spec.name}.{spec.kubernetes.namespace}.svc:{RDZV_PORT}"})
    container: dict[str, Any] = {
        "name": "train", "image": image(spec), "imagePullPolicy": spec.kubernetes.image_pull_policy,
        # --wait: a retry that starts while its killed predecessor's lease has not lapsed waits for it
        "command": kubetune_command(spec, "train", f"{SPEC_DIR}/spec.yaml", "--wait"),
        "workingDir": SCRATCH,  # relative paths in the spec land on the scratch volume, not the read-only root
        "env": env_list, **({"envFrom": env_from} if env_from else {}),
        "resources": resources(spec), "securityContext": container_security(), "volumeMounts": vols.mounts,
    }
    if nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT}]
    objects = [config_map(spec, "train")]
    if nodes > 1:
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": metadata(spec, spec.name, "train"), "spec": {
            "clusterIP": "None", "publishNotReadyAddresses": True,  # peers must resolve before they are ready
            "selector": {"batch.kubernetes.io/job-name": spec.name},
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}]}})
    objects.append(_job(spec, spec.name, "train", container, vols, completions=nodes, indexed=nodes > 1,
                        subdomain=spec.name if nodes > 1 else None))
    return objects


def stage_objects(spec: RunSpec) -> list[dict[str, Any]]:
    """The delivery Job: `kubetune stage` with the spec's stage section, no accelerator. Data scripts
    travel in the Job's own ConfigMap (the image does not have the user's files); the spec there
    points at their mounted copies."""
    name = f"{spec.name}-stage"
    scripts: dict[str, str] = {}
    data = []
    for i, item in enumerate(spec.stage.data):
        if item.script:
            path = Path(item.script)
            try:
                scripts[f"script-{i}.py"] = path.read_text()
            except OSError:
                raise UsageError(f"stage.data.{i}.script: cannot read {path}",
                                 "the script is copied into the stage Job's ConfigMap; check the path") from None
            item = item.model_copy(update={"script": f"{SPEC_DIR}/script-{i}.py"})
        data.append(item)
    staged = spec.model_copy(update={"stage": spec.stage.model_copy(update={"data": data})})
    env_list, env_from = env(spec)
    vols = add_dist(spec, volumes(spec, f"{name}-spec"), name)
    container = {
        "name": "stage", "image": image(spec), "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": kubetune_command(spec, "stage", f"{SPEC_DIR}/spec.yaml"),
        "env": env_list, **({"envFrom": env_from} if env_from else {}),
        "resources": resources(spec, cpu="2", memory="8Gi", accelerator=False),
        "securityContext": container_security(), "volumeMounts": vols.mounts,
    }
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(spec, f"{name}-spec", "stage"),
          "data": {"spec.yaml": spec_to_yaml(staged), **scripts}}
    job = _job(spec, name, "stage", container, vols, backoff=3)
    job["spec"]["template"]["spec"].pop("nodeSelector", None)  # no accelerator node needed to copy files
    job["spec"]["template"]["spec"].pop("tolerations", None)
    return [cm, job]
