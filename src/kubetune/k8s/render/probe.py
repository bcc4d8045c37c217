"""`kubetune doctor SPEC --probe`: one short pod that runs what the run's pods will need, from inside
the cluster — the run's image (pulled by the cluster's nodes), its service account (the
cloud identity the bucket sees), its environment and secret references, its PVC and GCS FUSE mounts —
and checks its storage with `python -m kubetune.storage.probe`. No accelerator, no node selector:
a probe must not wait for a GPU node, and asks for a tenth of a core."""

from __future__ import annotations

from typing import Any

from kubetune.k8s.render.common import (
    ACCELERATOR_RESOURCE, SCRATCH, container_security, env, metadata, node_disk, pod_placement, pod_security, uris,
    volumes,
)
from kubetune.k8s.render.image import add_dist, image, installs_at_start, kubetune_command, scratch_size, serving_image
from kubetune.spec.models import RunSpec
from kubetune.uris import has_scheme

INSTALL_SECONDS = 600  # pip installing the pinned set into the vendor image (minutes, not seconds)
PROBE_SECONDS = 300  # the pod's own deadline: a probe that hangs (a mount, the network) ends
PROBE_SCRATCH = "1Gi"
PULL_SECONDS = 900  # a vLLM image is 10-20 GB: its first pull on a node takes minutes
FIND_VLLM = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
# An AMD GPU pod's devices, opened as the run's pods open them: one JSON line per device (its group id,
# whether it opened read-write), then this process's groups. KUBETUNE_DEV_ROOT: tests point it at a folder.
OPEN_DEVICES = """import glob, json, os
root = os.environ.get("KUBETUNE_DEV_ROOT", "/dev")
for path in [os.path.join(root, "kfd"), *sorted(glob.glob(os.path.join(root, "dri", "renderD*")))]:
    row = {"device": "/dev/" + os.path.relpath(path, root)}
    try:
        row["gid"] = os.stat(path).st_gid
        os.close(os.open(path, os.O_RDWR))
        row["ok"] = True
    except OSError as exc:
        row.update(ok=False, error=exc.strerror or type(exc).__name__)
    print(json.dumps(row))
print(json.dumps({"groups": sorted(os.getgroups()), "uid": os.getuid()}))
"""


def probe_name(spec: RunSpec) -> str:
    return f"{spec.name}-doctor"[:63]


def probe_uris(spec: RunSpec) -> tuple[list[str], str]:
    """(inputs the pods read, the output they write) that live outside the image: buckets, PVCs, the Hub."""
    inputs = [u for u in dict.fromkeys(uris(spec)[1:]) if has_scheme(u)]
    return inputs, spec.output_uri


def probe_seconds(spec: RunSpec) -> int:
    """The probe's deadline, with the time to install kubetune when the pod does that at start."""
    return PROBE_SECONDS + (INSTALL_SECONDS if installs_at_start(spec) else 0)


def probe_pod(spec: RunSpec) -> dict[str, Any]:
    k = spec.kubernetes
    env_list, env_from = env(spec)
    vols = add_dist(spec, volumes(spec, None, scratch=False), probe_name(spec))
    scratch = scratch_size(spec, PROBE_SCRATCH)
    vols.volumes.append({"name": "scratch", "emptyDir": {"sizeLimit": scratch}})
    vols.mounts.append({"name": "scratch", "mountPath": SCRATCH})
    inputs, output = probe_uris(spec)
    args = [a for uri in inputs for a in ("--read", uri)] + ["--write", output]
    small = {"cpu": "100m", "memory": "1Gi", "ephemeral-storage": node_disk(spec, scratch)}
    container: dict[str, Any] = {
        "name": "probe", "image": image(spec), "imagePullPolicy": k.image_pull_policy,
        "command": kubetune_command(spec, *args, module="kubetune.storage.probe"),
        "workingDir": SCRATCH, "env": env_list, **({"envFrom": env_from} if env_from else {}),
        "resources": {"requests": dict(small), "limits": dict(small)},
        "securityContext": container_security(), "volumeMounts": vols.mounts,
    }
    meta = metadata(spec, probe_name(spec), "doctor")
    pod: dict[str, Any] = {
        "restartPolicy": "Never", "activeDeadlineSeconds": probe_seconds(spec),
        "securityContext": pod_security(spec), "containers": [container], "volumes": vols.volumes,
        **({"serviceAccountName": k.service_account} if k.service_account else {}),
    }
    if vols.annotations:
        meta["annotations"] = dict(vols.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod}


def device_probe_pod(spec: RunSpec) -> dict[str, Any]:
    """AMD: a pod on the run's GPU nodes asking for one amd.com/gpu, run as the run's pods run (non-root,
    their supplementalGroups), that opens /dev/kfd and the render nodes read-write and reports each one's
    group id: the node's groups are what kubernetes.device_groups must hold. The run's image (python3)."""
    return _script_pod(spec, f"{spec.name[:48]}-doctor-devices", image(spec), OPEN_DEVICES,
                       {ACCELERATOR_RESOURCE["amd"]: "1"}, pod_placement(spec))


def serving_probe_pod(spec: RunSpec) -> dict[str, Any]:
    """A pod with the serving image that only looks for vLLM in it (no import: that would look for a device):
    the nodes can pull the image `deploy` will use, and it is a vLLM image. No accelerator, no token."""
    return _script_pod(spec, f"{spec.name[:50]}-doctor-serve", serving_image(spec), FIND_VLLM)


def _script_pod(spec: RunSpec, name: str, image_name: str, script: str, devices: dict[str, str] | None = None,
                placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """A small pod that runs one Python snippet with the image's python3 and ends: no service-account token,
    the run's pod security, a deadline long enough for a first pull of a large image."""
    small = {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": node_disk(spec), **(devices or {})}
    container: dict[str, Any] = {
        "name": "probe", "image": image_name, "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": ["python3", "-c", script], "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": {"requests": dict(small), "limits": dict(small)},
        "securityContext": container_security(),
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata(spec, name, "doctor"),
            "spec": {"restartPolicy": "Never", "activeDeadlineSeconds": PULL_SECONDS,
                     "automountServiceAccountToken": False, "enableServiceLinks": False,
                     "securityContext": pod_security(spec), **(placement or {}), "containers": [container]}}
