"""What accelerators this machine has, found through each vendor's own runtime, and the check that
a run asking for one gets it (instead of quietly training on the CPU in fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec

NAMES = {"nvidia": "NVIDIA GPU (CUDA)", "amd": "AMD GPU (ROCm)", "gaudi": "Intel Gaudi (HPU)", "cpu": "CPU"}


@dataclass(frozen=True)
class Found:
    kind: str          # nvidia | amd | gaudi | cpu
    count: int
    detail: str

    def describe(self) -> str:
        return f"{self.count} x {NAMES[self.kind]} ({self.detail})" if self.kind != "cpu" else f"only a CPU ({self.detail})"


def detect() -> Found:
    """The accelerator this process can use: Gaudi through habana_frameworks, CUDA and ROCm through
    torch (which is built for one of them: torch.version.hip tells ROCm from CUDA)."""
    import torch

    try:  # Gaudi's runtime is its own package; it registers the hpu device with torch
        import habana_frameworks.torch.hpu as hpu  # type: ignore[import-not-found]

        if hpu.is_available():
            return Found("gaudi", int(hpu.device_count()), "habana_frameworks")
    except ImportError:
        pass
    build = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        kind = "amd" if getattr(torch.version, "hip", None) else "nvidia"
        return Found(kind, torch.cuda.device_count(), f"{build}, {torch.cuda.get_device_name(0)}")
    runtime = "ROCm" if getattr(torch.version, "hip", None) else "CUDA" if torch.version.cuda else "no GPU runtime"
    return Found("cpu", 1, f"{build}, {runtime}, no device visible")


def check_accelerator(spec: RunSpec) -> Found:
    """resources.accelerator nvidia/amd/gaudi needs that device here (exit 2 naming what was found);
    auto takes what is there; cpu always works."""
    wanted = spec.resources.accelerator
    found = detect()
    if wanted in ("auto", "cpu") or wanted == found.kind:
        if wanted != "cpu" and found.kind != "cpu" and found.count < spec.resources.devices_per_node:
            raise UsageError(f"resources.devices_per_node is {spec.resources.devices_per_node}, but this machine has "
                             f"{found.describe()}", "lower resources.devices_per_node, or run on a bigger machine")
        return found
    raise UsageError(f"resources.accelerator is {wanted}, but this machine has {found.describe()}",
                     f"run where a {NAMES[wanted]} is visible (on Kubernetes the rendered Job requests one), or set "
                     "resources.accelerator: auto to use what is here")


# What the rest of training asks about the device it runs on. Gaudi is reached through its vendor's
# route for transformers: habana_frameworks registers torch's `hpu` device, and transformers (>= 4.49,
# with accelerate >= 1.5) trains on it when use_cpu is off — the same Trainer, bf16 native.

def _hpu() -> Any:
    import habana_frameworks.torch.hpu as hpu  # type: ignore[import-not-found]

    return hpu


def device_type(accelerator: str) -> str:
    """The torch device type this process trains on: "hpu" (Gaudi), "cuda" (NVIDIA, and ROCm's build of
    torch) or "cpu" — the CPU when the spec says cpu or nothing else is here."""
    if accelerator == "cpu":
        return "cpu"
    kind = detect().kind
    return "hpu" if kind == "gaudi" else "cuda" if kind in ("nvidia", "amd") else "cpu"


def bf16_supported(device: str) -> bool:
    import torch

    if device == "hpu":
        return True  # Gaudi's training type (Intel's mixed-precision guide: bf16 autocast)
    return device == "cuda" and bool(torch.cuda.is_bf16_supported())


def device_name(device: str) -> str | None:
    """The device's product name (the FLOPs table and the plan name devices by it)."""
    import torch

    if device == "cuda":
        return str(torch.cuda.get_device_name(0))
    if device == "hpu":
        return str(_hpu().get_device_name())
    return None


def device_total_memory(device: str) -> float | None:
    """Bytes of one device here: CUDA's properties, Gaudi's allocator limit (memory_stats()["Limit"])."""
    import torch

    if device == "cuda":
        return float(torch.cuda.get_device_properties(0).total_memory)
    if device == "hpu":
        return float(_hpu().memory_stats()["Limit"])
    return None


def device_peak_allocated(device: str) -> int | None:
    import torch

    if device == "cuda" and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    if device == "hpu":
        return int(_hpu().memory_stats().get("MaxInUse", 0)) or None
    return None
