"""This exact kubetune, as the pods that install it at start receive it (k8s/render/image.py): one
ConfigMap per run with its wheel, its pinned requirements for the vendor image (the image's torch kept;
PyTorch's CPU index for the CPU image; bitsandbytes on NVIDIA for QLoRA), a key naming that pair (the
install directory: a retried pod with the install cache finds it there) and the version.

The wheel is built from the installed package itself (PEP 427: the files, a dist-info with METADATA,
WHEEL, entry points and RECORD), byte for byte the same for the same code — a laptop with kubetune
installed from a wheel, a source checkout or a CI runner all send what they run. Side effects (reading
the package's files) live here, at the edge; rendering only mounts the ConfigMap by name."""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path
from typing import Any

import kubetune
from kubetune.errors import UsageError
from kubetune.k8s.render.common import metadata
from kubetune.k8s.render.image import CPU_TORCH_INDEX, DIST_VOLUME, VENDOR_IMAGES, installs_at_start
from kubetune.spec.models import RunSpec

# A ConfigMap holds at most 1 MiB, and binaryData is base64 (4/3): the wheel must stay well under it.
MAX_WHEEL = 700 * 1024
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip timestamps fixed: the same code gives the same bytes and key


@functools.cache
def wheel() -> tuple[str, bytes]:
    """(file name, bytes) of the running kubetune as a wheel."""
    package = Path(kubetune.__file__).parent
    dist = importlib.metadata.distribution("kubetune")
    version = dist.version
    info = f"kubetune-{version}.dist-info"
    files = [(f"kubetune/{p.relative_to(package).as_posix()}", p.read_bytes())
             for p in sorted(package.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")]
    meta = dist.metadata
    lines = ["Metadata-Version: 2.1", "Name: kubetune", f"Version: {version}"]
    if meta.get("Requires-Python"):
        lines.append(f"Requires-Python: {meta['Requires-Python']}")
    lines += [f"Requires-Dist: {r}" for r in meta.get_all("Requires-Dist") or []]
    files.append((f"{info}/METADATA", ("\n".join(lines) + "\n").encode()))
    files.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: kubetune\nRoot-Is-Purelib: true\nTag: py3-none-any\n"))
    entry_points = dist.read_text("entry_points.txt") or "[console_scripts]\nkubetune = kubetune.cli:run\n"
    files.append((f"{info}/entry_points.txt", entry_points.encode()))
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files] + [f"{info}/RECORD,,"]
    files.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            entry = zipfile.ZipInfo(name, _EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, data)
    return f"kubetune-{version}-py3-none-any.whl", out.getvalue()


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pins() -> list[str]:
    """The pinned working set (src/kubetune/requirements.txt), requirement lines only."""
    text = (Path(kubetune.__file__).parent / "requirements.txt").read_text()
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def requirements_for(spec: RunSpec) -> str:
    """What the pod installs before the wheel: the pins, fitted to the vendor image."""
    return requirements_for_accelerator(spec.resources.accelerator)


def requirements_for_accelerator(accelerator: str) -> str:
    """The pins fitted to the accelerator's vendor image (an image build installs the same)."""
    image_torch = VENDOR_IMAGES.get(accelerator, VENDOR_IMAGES["cpu"])[1]
    lines = [p for p in pins() if not (image_torch and p.startswith("torch=="))]  # the vendor's torch kept
    if not image_torch:
        lines.insert(0, f"--extra-index-url {CPU_TORCH_INDEX}")  # torch's CPU build, not PyPI's CUDA one
    if accelerator == "nvidia":
        lines.append("bitsandbytes==0.50.2")  # QLoRA and 8-bit optimizers are CUDA's
    return "\n".join(lines) + "\n"


OWNER_LABEL = "kubetune.dev/owner"  # the Job, Deployment or probe whose pods install from it


def dist_config_map(spec: RunSpec, owner: str) -> dict[str, Any]:
    """The ConfigMap, named by its content (`OWNER-kubetune-KEY`) and immutable: applying the objects
    again with other code makes a new one for new pods, and never changes what the pods of a Job
    that is still running (its retries, its other nodes) install."""
    wheel_name, data = wheel()
    if len(data) > MAX_WHEEL:
        raise UsageError(f"kubetune's wheel is {len(data) // 1024} KiB, too big to travel in a ConfigMap",
                         "set kubernetes.image to an image with kubetune installed (deploy/Dockerfile)")
    requirements = requirements_for(spec)
    key = hashlib.sha256(data + requirements.encode()).hexdigest()[:16]
    version = wheel_name.split("-")[1]
    meta = metadata(spec, f"{owner}-{key[:10]}", "kubetune", **{OWNER_LABEL: owner.removesuffix("-kubetune")})
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "immutable": True,
            "data": {"requirements.txt": requirements, "key": key, "version": version},
            "binaryData": {wheel_name: base64.b64encode(data).decode()}}


def with_dist(spec: RunSpec, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects after the ConfigMaps their pods install kubetune from, one per object that mounts one;
    each mount is pointed at its ConfigMap's content-addressed name (the objects are changed in place)."""
    if not installs_at_start(spec):
        return objects
    made: dict[str, dict[str, Any]] = {}
    for obj in objects:
        for volume in _dist_volumes(obj):
            owner = volume["configMap"]["name"]  # as rendered: OWNER-kubetune
            made.setdefault(owner, dist_config_map(spec, owner))
            volume["configMap"]["name"] = made[owner]["metadata"]["name"]
    return [*made.values(), *objects]


def _dist_volumes(obj: dict[str, Any]) -> list[dict[str, Any]]:
    body = obj.get("spec") or {}
    pod = (body.get("template") or {}).get("spec") or body
    return [v for v in pod.get("volumes") or [] if v.get("name") == DIST_VOLUME]
