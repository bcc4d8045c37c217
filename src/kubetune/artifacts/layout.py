"""Where things live inside a run folder (DESIGN.md, "Run layout")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import UsageError

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


def local_run(uri: str) -> RunLayout:
    """The run folder for an output URI; only local paths in this version."""
    if "://" in uri:
        raise UsageError(
            f"output {uri}: {uri.split('://')[0]}:// outputs are not supported by this version",
            "use a local output folder (object storage support is tracked in the storage issue)",
        )
    return RunLayout(Path(uri))


def open_run(run: str) -> RunLayout:
    """An existing run folder (for merge, chat, eval): must hold spec.yaml."""
    layout = local_run(run)
    if not layout.spec.exists():
        raise UsageError(f"{run} is not a kubetune run folder (no spec.yaml)", "pass runs/NAME of a trained run")
    return layout
