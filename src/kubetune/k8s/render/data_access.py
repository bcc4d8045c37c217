"""The data-access pod of `kubetune copy` (workflow C: local files onto a PVC, a trained run copied
out of one): the claim mounted at /data, a stdlib-only server (k8s/pvc_server.py) reached through
the API server's pod proxy, the copy's one-time token read from a Secret by reference.

It runs as the spec's non-root UID/GID/fsGroup (files it writes belong to the run's pods), without a
service account token, privileges or service links, asks for half a core, and ends by itself: after
IDLE_SECONDS without a request, or at its deadline."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from kubetune.k8s.render.common import container_security
from kubetune.k8s.render.image import VENDOR_IMAGES
from kubetune.spec.models import KubernetesSpec

MOUNT = "/data"
PORT = 8080
IDLE_SECONDS = 900
DEADLINE_SECONDS = 6 * 3600
TOKEN_KEY = "token"
SMALL = {"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "256Mi"}


def server_source() -> str:
    return files("kubetune.k8s").joinpath("pvc_server.py").read_text()


def data_access_image(k: KubernetesSpec) -> str:
    """The team's image when it has one (an air-gapped cluster mirrors that one); otherwise a small
    public Python image — the server needs Python, not kubetune or torch."""
    return k.image or VENDOR_IMAGES["cpu"][0]


def data_access_pod(k: KubernetesSpec, claim: str, name: str, secret: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "data-access",
              "app.kubernetes.io/managed-by": "kubetune", "kubetune.dev/pvc": claim, **k.labels}
    small = dict(SMALL)
    container: dict[str, Any] = {
        "name": "copy", "image": data_access_image(k), "imagePullPolicy": k.image_pull_policy,
        "command": ["python3", "-c", server_source(), MOUNT, str(PORT), str(IDLE_SECONDS)],
        "ports": [{"name": "copy", "containerPort": PORT, "protocol": "TCP"}],
        "env": [{"name": "KUBETUNE_COPY_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": PORT}, "periodSeconds": 2},
        "resources": {"requests": dict(small), "limits": dict(small)},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "data", "mountPath": MOUNT}],
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": k.namespace, "labels": labels},
        "spec": {
            "restartPolicy": "Never", "activeDeadlineSeconds": DEADLINE_SECONDS,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": k.run_as_user, "runAsGroup": k.run_as_group,
                                "fsGroup": k.fs_group, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }
