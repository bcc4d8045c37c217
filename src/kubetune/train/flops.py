"""FLOPs per trained token and device peaks, for MFU in progress lines and time estimates in plan.

Per token: forward 2N (+ attention), backward 2N for LoRA (activation gradients only; the frozen
weights need none) or 4N for full fine-tuning — so 4N vs 6N. Peaks are dense bf16 tensor-core
numbers for accelerators and fp32 FMA (AVX2: 32 FLOP/cycle at ~2.5 GHz) per CPU core: rough by
design, and named in the output so nobody mistakes them for a measurement.
"""

from __future__ import annotations

import os

# name fragment (upper case) → dense bf16 peak FLOP/s per device
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "MI300": 1307e12, "MI250": 362e12, "GAUDI2": 432e12, "GAUDI3": 1835e12}
KIND_PEAKS = {"nvidia": 989e12, "amd": 1307e12, "gaudi": 432e12}
CPU_CORE_PEAK = 80e9


def flops_per_token(params: int, full: bool, layers: int = 0, hidden: int = 0, mean_len: float = 0.0) -> float:
    factor = 3 if full else 2  # forward + backward, relative to the forward pass
    attention = 2 * layers * hidden * mean_len  # QK^T and AV over the causal half of the context, forward
    return factor * (2 * params + attention)


def device_peak(kind: str, device_name: str | None = None, devices: int = 1) -> float:
    """Peak FLOP/s of ``devices`` accelerators of ``kind`` (or of this machine's CPU cores)."""
    if kind == "cpu":
        return CPU_CORE_PEAK * (os.cpu_count() or 1)
    name = (device_name or "").upper()
    for fragment, peak in GPU_PEAKS.items():
        if fragment in name:
            return peak * devices
    return KIND_PEAKS.get(kind, KIND_PEAKS["nvidia"]) * devices
