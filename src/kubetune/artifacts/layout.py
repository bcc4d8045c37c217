"""Where things live inside a run folder (DESIGN.md, "Run layout")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COMPLETE = "COMPLETE"


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

    def is_finished(self) -> bool:
        return self.final_complete.exists()

