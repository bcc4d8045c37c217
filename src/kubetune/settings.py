"""Every `KUBETUNE_*` environment variable kubetune reads, in one place (the README lists them too).

Settings that belong to a run live in its spec; these are about the machine a process runs on
(where its caches and working copies go, how long it waits for storage) and are set by the
rendered pods or by a user for one machine. Each is read when it is needed, never at import, so
tests and torchrun ranks that set them see their own values.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = [
    "API_KEY", "CACHE", "DEBUG", "GCS_MOUNT", "JOB_RETRY_SECONDS", "LEASE_HOLDER", "LEASE_SECONDS", "PREEMPT_UPLOAD_SECONDS",
    "PREFLIGHT_RETRIES", "PVC_ROOT", "RANK_EXITS", "RDZV_ENDPOINT", "SKIP_MEMORY_CHECK", "UPLOAD_RETRY_SECONDS",
    "WORKDIR", "skip_memory_check",
    "api_key", "cache_dir", "debug", "gcs_mount", "job_retry_seconds", "lease_holder", "lease_seconds", "preempt_upload_seconds",
    "preflight_retries", "pvc_root", "rdzv_endpoint", "upload_retry_seconds", "workdir",
]

CACHE = "KUBETUNE_CACHE"                    # data and object caches (default ~/.cache/kubetune)
WORKDIR = "KUBETUNE_WORKDIR"                # local working copies of object-storage runs (a pod's scratch volume)
PVC_ROOT = "KUBETUNE_PVC_ROOT"              # where pvc://CLAIM/... is mounted in pods (default /mnt/pvc)
GCS_MOUNT = "KUBETUNE_GCS_MOUNT"            # where gs://BUCKET/... is mounted by GCS FUSE in pods
UPLOAD_RETRY_SECONDS = "KUBETUNE_UPLOAD_RETRY_SECONDS"      # one upload retries this long (default 900)
PREEMPT_UPLOAD_SECONDS = "KUBETUNE_PREEMPT_UPLOAD_SECONDS"  # uploads after SIGTERM get this long (default 120)
PREFLIGHT_RETRIES = "KUBETUNE_PREFLIGHT_RETRIES"            # attempts of a pre-flight check that failed transiently (4)
LEASE_SECONDS = "KUBETUNE_LEASE_SECONDS"    # a run's writer lease lives this long unless renewed (default 60)
LEASE_HOLDER = "KUBETUNE_LEASE_HOLDER"      # this trainer's name in the lease (default HOST:PID)
RDZV_ENDPOINT = "KUBETUNE_RDZV_ENDPOINT"    # host:port of node 0 for multi-node torchrun (set by the Indexed Job)
API_KEY = "KUBETUNE_API_KEY"                # key that `serve` requires and `chat` sends
DEBUG = "KUBETUNE_DEBUG"                    # 1: print the Python traceback of an unexpected error
SKIP_MEMORY_CHECK = "KUBETUNE_SKIP_MEMORY_CHECK"  # 1: train/render/submit a plan that does not fit (the plan is wrong here)
JOB_RETRY_SECONDS = "KUBETUNE_JOB_RETRY_SECONDS"  # kubetune server: wait before retrying a job that exited 75 (30)
RANK_EXITS = "KUBETUNE_RANK_EXITS"          # set by the torchrun launcher for its ranks: where they leave exit codes


def _float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def skip_memory_check() -> bool:
    return os.environ.get(SKIP_MEMORY_CHECK, "") not in ("", "0", "false", "no")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "kubetune"))


def workdir() -> Path:
    return Path(os.environ.get(WORKDIR) or os.path.join(os.path.expanduser("~"), ".cache", "kubetune", "work"))


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT, "/mnt/pvc"))


def gcs_mount() -> str | None:
    return os.environ.get(GCS_MOUNT) or None


def upload_retry_seconds() -> float:
    return _float(UPLOAD_RETRY_SECONDS, 900.0)


def job_retry_seconds() -> float:
    return _float(JOB_RETRY_SECONDS, 30.0)


def preempt_upload_seconds() -> float:
    return _float(PREEMPT_UPLOAD_SECONDS, 120.0)


def preflight_retries() -> int:
    return max(1, int(_float(PREFLIGHT_RETRIES, 4)))


def lease_seconds() -> float:
    return max(3.0, _float(LEASE_SECONDS, 60.0))


def lease_holder() -> str:
    # In a pod the host name is the pod's name: unique per attempt of a Job.
    return os.environ.get(LEASE_HOLDER) or f"{socket.gethostname()}:{os.getpid()}"


def rdzv_endpoint() -> str | None:
    return os.environ.get(RDZV_ENDPOINT) or None


def api_key() -> str | None:
    return os.environ.get(API_KEY) or None


def debug() -> bool:
    return os.environ.get(DEBUG, "") not in ("", "0", "false", "no")
