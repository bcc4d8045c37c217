"""What a training process actually holds, measured (the memory plan is checked against these)."""

from __future__ import annotations

from typing import Any


def local_bytes(tensor: Any) -> int:
    """Bytes of a tensor held by this process: under FSDP2 a parameter is a DTensor whose local shard
    is the part this rank stores."""
    local = getattr(tensor, "_local_tensor", tensor)
    return int(local.numel() * local.element_size())


def held_bytes(model: Any, optimizer: Any = None) -> int:
    """Parameters (and their gradients, when present) plus optimizer state, as stored by this process."""
    import torch

    total = 0
    for p in model.parameters():
        total += local_bytes(p)
        if p.grad is not None:
            total += local_bytes(p.grad)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += local_bytes(value)
    return total


def peak_memory_bytes(accelerator: str = "auto") -> int:
    """This process's peak memory: what the device's allocator handed out on a GPU or Gaudi, else the
    resident set's high-water mark."""
    from kubetune.train.devices import device_peak_allocated, device_type

    return device_peak_allocated(device_type(accelerator)) or peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set of this process. On Linux, VmHWM of its own address space: getrusage's ru_maxrss
    also keeps the peak of the address space it replaced at exec, so a training process started by a
    large parent (a test run, a control-plane server, a bench) reported the parent's resident set."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
