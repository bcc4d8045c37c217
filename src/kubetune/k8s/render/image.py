"""What a kubetune container runs in, and how it starts.

Two ways, chosen by `kubernetes.image`:
- unset (the default): the accelerator vendor's public PyTorch image (pinned below, its torch kept),
  and this exact kubetune — its wheel and its pinned dependencies travel with the Job in a ConfigMap
  (`kubetune.k8s.dist` builds it where the objects are applied) — installed when the pod starts, into
  `kubernetes.install_cache` (a PVC: a retried pod finds it installed) or else the pod's scratch volume;
- set: an image the team built with kubetune installed (deploy/Dockerfile), run as it is.

Pure, like the rest of rendering: the wheel's bytes are not read here, only where they will be mounted.
"""

from __future__ import annotations

import re

from kubetune.k8s.render.common import SCRATCH, Volumes
from kubetune.spec.models import RunSpec

# (image, torch comes with the image). Tags are pinned: a moving tag would change the torch under a run
# between its retries. Sources: NVIDIA/CUDA — the PyTorch project's images on Docker Hub; AMD — AMD's
# rocm/pytorch (ROCm docs, "PyTorch on ROCm": Docker image); Intel Gaudi — Intel's Gaudi PyTorch
# installer image (Gaudi docs, "Docker Installation"); CPU — the Python project's slim image, with
# torch's CPU build from PyTorch's own index.
VENDOR_IMAGES: dict[str, tuple[str, bool]] = {
    "nvidia": ("pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime", True),
    "amd": ("rocm/pytorch:rocm6.4_ubuntu22.04_py3.11_pytorch_release_2.6.0", True),
    "gaudi": ("vault.habana.ai/gaudi-docker/1.21.0/ubuntu22.04/habanalabs/pytorch-installer-2.6.0:1.21.0-555", True),
    "cpu": ("python:3.11-slim", False),
}
# vLLM's OpenAI server, built for each accelerator (serve.image unset). Sources: NVIDIA — vLLM's own image on
# Docker Hub (docs.vllm.ai, "Using Docker"); AMD — AMD's rocm/vllm (ROCm docs, "vLLM inference"); Intel Gaudi —
# Intel's vllm-installer image, vLLM with the vLLM Hardware Plugin for Intel Gaudi (docs.vllm.ai/projects/gaudi,
# "Quick Start"); CPU — vLLM's CPU release image (docs.vllm.ai, "CPU": pre-built images).
SERVING_IMAGES: dict[str, str] = {
    "nvidia": "vllm/vllm-openai:v0.11.0",
    "amd": "rocm/vllm:rocm6.4.1_vllm_0.10.1_20250909",
    "gaudi": "vault.habana.ai/gaudi-docker/1.22.0/ubuntu22.04/habanalabs/vllm-installer-2.7.1:1.22.0-740",
    "cpu": "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.11.0",
}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DIST_DIR = "/opt/kubetune/dist"     # the ConfigMap: the wheel, requirements.txt, key, version
CACHE_DIR = "/opt/kubetune/cache"   # kubernetes.install_cache, when set
INSTALL_SIZE = "4Gi"                # the pinned set in a venv (measured: 2.0 GiB without torch, 2.7 GiB with its CPU build)

# Run as `sh -c BOOT kubetune -m MODULE ARGS...`. Installs once per (image, Python, wheel, pins): a venv over
# the image's packages — --system-site-packages, plus a .pth naming the image interpreter's own site dirs
# (an image whose python3 is itself a venv, as recent ROCm images are, is not seen through
# --system-site-packages); --without-pip needs no ensurepip, which Debian-based images lack — then the
# pins under a constraint holding the image's torch (a pin that wants another torch fails the install
# loudly instead of pulling PyPI's CUDA build over a ROCm or Gaudi one), then the wheel without
# dependencies. `.installed` is written last, so a pod killed mid-install leaves nothing that looks
# installed; flock: pods sharing the cache install one at a time; set -eu: any failed step fails the pod.
BOOT = """set -eu
dist="${KUBETUNE_DIST:-%(dist)s}"
py="$(python3 -c 'import sys; print("py%%d.%%d" %% sys.version_info[:2])')"
root="${KUBETUNE_INSTALL_ROOT:-%(root)s}/%(image)s-$py-$(cat "$dist/key")"
mkdir -p "$(dirname "$root")"
if command -v flock >/dev/null 2>&1; then exec 9>"$root.lock"; flock 9; fi
if [ ! -e "$root/.installed" ]; then
  echo "kubetune: installing kubetune $(cat "$dist/version") and its pinned dependencies into $root" >&2
  rm -rf "$root"
  python3 -m venv --without-pip --system-site-packages "$root"
  python3 -c 'import site; print("\\n".join(site.getsitepackages()))' \\
    > "$("$root/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/kubetune-image.pth"
  python3 -c 'import torch; print("torch==" + torch.__version__)' > "$root.constraints" 2>/dev/null \\
    || : > "$root.constraints"
  "$root/bin/python" -m pip install --no-input --disable-pip-version-check -c "$root.constraints" \\
    -r "$dist/requirements.txt"
  "$root/bin/python" -m pip install --no-input --disable-pip-version-check --no-deps "$dist"/kubetune-*.whl
  touch "$root/.installed"
fi
if command -v flock >/dev/null 2>&1; then flock -u 9; fi
exec "$root/bin/python" "$@"
"""

def installs_at_start(spec: RunSpec) -> bool:
    return spec.kubernetes.image is None


def vendor(spec: RunSpec) -> tuple[str, bool]:
    """The vendor image of the spec's accelerator (auto asks for no device on a cluster: the CPU image)."""
    return VENDOR_IMAGES.get(spec.resources.accelerator, VENDOR_IMAGES["cpu"])


def image(spec: RunSpec) -> str:
    return spec.kubernetes.image or vendor(spec)[0]


def serving_image(spec: RunSpec) -> str:
    """vLLM's server image: serve.image, or vLLM's build for the accelerator (auto asks for no device: CPU)."""
    return spec.serve.image or SERVING_IMAGES.get(spec.resources.accelerator, SERVING_IMAGES["cpu"])


DIST_VOLUME = "kubetune-dist"


def dist_name(owner: str) -> str:
    """The ConfigMap with this kubetune's wheel and pins for the objects named `owner` (the run's Job,
    its stage Job, its serving Deployment, the doctor's probe: each its own, so deploying serving with a
    newer kubetune never changes what a retried training pod installs). kubetune.k8s.dist fills it."""
    return f"{owner}-kubetune"


def kubetune_command(spec: RunSpec, *args: str, module: str = "kubetune") -> list[str]:
    """`kubetune ARGS` (or `python -m MODULE ARGS`) in the container: through BOOT when it installs at start."""
    if not installs_at_start(spec):
        return ["kubetune", *args] if module == "kubetune" else ["python", "-m", module, *args]
    root = CACHE_DIR if spec.kubernetes.install_cache else f"{SCRATCH}/.kubetune"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", image(spec)).strip("-")[-80:]  # one install per image on a shared cache
    return ["/bin/sh", "-c", BOOT % {"dist": DIST_DIR, "root": root, "image": slug}, "kubetune", "-m", module, *args]


def add_dist(spec: RunSpec, vols: Volumes, owner: str) -> Volumes:
    """The wheel's ConfigMap and the install cache, mounted where BOOT looks for them. Without a cache
    PVC and without the scratch volume (an init container of serving), the install goes to /tmp."""
    if not installs_at_start(spec):
        return vols
    vols.volumes.append({"name": DIST_VOLUME, "configMap": {"name": dist_name(owner)}})
    vols.mounts.append({"name": DIST_VOLUME, "mountPath": DIST_DIR, "readOnly": True})
    if spec.kubernetes.install_cache:
        vols.volumes.append({"name": "kubetune-cache",
                             "persistentVolumeClaim": {"claimName": spec.kubernetes.install_cache}})
        vols.mounts.append({"name": "kubetune-cache", "mountPath": CACHE_DIR})
    return vols


def scratch_size(spec: RunSpec, size: str) -> str:
    """A small scratch volume (serving's, the probe's) grown by what an install at start puts there."""
    from kubetune.k8s.render.common import quantity_sum

    return quantity_sum(size, INSTALL_SIZE) if installs_at_start(spec) and not spec.kubernetes.install_cache else size
