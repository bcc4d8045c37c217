"""total_batch_size + max_per_device_batch_size + world size → per-device batch and accumulation."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.errors import Problem, SpecError


@dataclass(frozen=True)
class BatchShape:
    per_device: int
    accumulation: int
    world_size: int

    @property
    def total(self) -> int:
        return self.per_device * self.accumulation * self.world_size


def batch_shape(total: int, max_per_device: int, world_size: int) -> BatchShape:
    """The largest per-device batch <= max_per_device that divides each device's share exactly,
    so the effective batch is exactly ``total`` (never silently rounded)."""
    if total % world_size:
        raise SpecError([Problem("train.total_batch_size",
                                 f"{total} is not divisible by the world size {world_size}")])
    share = total // world_size
    per_device = max(d for d in range(1, min(max_per_device, share) + 1) if share % d == 0)
    return BatchShape(per_device, share // per_device, world_size)


def optimizer_steps(n_rows: int, total: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    per_epoch = -(-n_rows // total)  # ceil: the last short batch is still a step
    return max(1, int(per_epoch * epochs + 0.999999))
