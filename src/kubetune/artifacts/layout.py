"""Where things live inside a run folder (docs/design.md, "Run layout")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.spec.models import RunSpec

COMPLETE = "COMPLETE"


def serves_merged(spec: RunSpec) -> bool:
    """The one rule for what a run serves, locally and on Kubernetes alike, decided by its spec alone:
    a full fine-tune its whole model (final/merged); a LoRA or QLoRA run its adapter on the base
    (final/adapter), whether or not `kubetune merge` has written final/merged beside it — that folder
    is served by naming it (`serve RUN/final/merged`, `deploy --run RUN/final/merged`)."""
    return spec.method.type == "full"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def adapter(self) -> Path:
        return self.final / "adapter"

    @property
    def merged(self) -> Path:
        return self.final / "merged"

    @property
    def final_complete(self) -> Path:
        return self.final / COMPLETE

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def served(self, spec: RunSpec) -> Path:
        """The folder this run serves (serves_merged)."""
        return self.merged if serves_merged(spec) else self.adapter

    def is_finished(self) -> bool:
        return self.final_complete.exists()

