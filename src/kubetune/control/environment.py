"""The environment of a process the server starts for a tenant's job (validation, training).

The server's own environment holds what a job must never see: its database URL and password, API
keys, the operator's other credentials. A job gets an allow-list: what any Python process needs
(PATH, HOME, locale, caches, device visibility), kubetune's machine settings, and the credentials of
what this job uses — storage for its files and run, the Hub token for a Hub model, the tracker it
reports to, the judge models its graders ask — plus the names the operator lists in the server
configuration (`env`).
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

from kubetune import settings
from kubetune.spec.models import RunSpec
from kubetune.uris import is_hub, scheme

__all__ = ["job_environment"]

ALWAYS = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TERM",
          "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "LD_LIBRARY_PATH",
          "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY",
          "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
          "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
          "HABANA_VISIBLE_DEVICES", "PT_HPU_*", "NCCL_*", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
          "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
          "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_ENDPOINT", "TORCH_HOME", "TRITON_CACHE_DIR",
          "XDG_CACHE_HOME", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "KUBETUNE_*")
NEVER = (settings.API_KEY,)
STORAGE = {"s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE",
                  "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE"),
           "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
HUB = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
TRACKERS = {"mlflow": ("MLFLOW_*",), "wandb": ("WANDB_*",), "tensorboard": ()}


def job_environment(spec: RunSpec, server_env: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
    """What a process of `spec`'s job gets from `server_env`."""
    allowed = list(ALWAYS) + list(extra)
    uris = [spec.output_uri, spec.model.base, *(s.path for s in spec.data.sources()),
            *([spec.model.adapter] if spec.model.adapter else [])]
    source = spec.data.eval_source()
    uris += [source.path] if source else []
    for kind in {scheme(u) for u in uris}:
        allowed += STORAGE.get(kind, ())
    if any(is_hub(u) for u in uris):
        allowed += HUB
    for tracker in spec.tracking.report_to:
        allowed += TRACKERS.get(tracker, ())
    # graders' judge and embedding models: the keys of the endpoints the operator named, by their variables
    allowed += [j.api_key_env for j in spec.method.grpo.endpoints().values() if j.api_key_env]
    return {k: v for k, v in server_env.items()
            if k not in NEVER and any(fnmatch.fnmatchcase(k, pattern) for pattern in allowed)}
