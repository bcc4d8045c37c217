"""This process's place among torchrun's ranks, and leaving together."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def launched(self) -> bool:
        """Started by torchrun (one of its ranks), rather than by a user."""
        return "LOCAL_RANK" in os.environ

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


def finish_distributed() -> None:
    """Ranks leave together: without this a rank that is done exits while rank 0 still saves, and
    gloo/NCCL may abort (SIGABRT) in the exiting rank when its peer's connection goes away."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
