"""Where things live inside a run (docs/design.md, "Run layout"): one key for each thing a run holds.

`RUN_KEYS` are relative keys with '/', the same for a local folder and an object-storage prefix (a
store's keys, a folder's relative paths); `RunLayout` is them on a local root. Nothing outside the
`runs` package spells a run's file names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec

COMPLETE = "COMPLETE"
CHECKPOINT_PREFIX = "checkpoint-"


def serves_merged(spec: RunSpec) -> bool:
    """The one rule for what a run serves, locally and on Kubernetes alike, decided by its spec alone:
    a full fine-tune its whole model (final/merged); a LoRA or QLoRA run its adapter on the base
    (final/adapter), whether or not `kubetune merge` has written final/merged beside it — that folder
    is served by naming it (`serve RUN/final/merged`, `deploy --run RUN/final/merged`)."""
    return spec.method.type == "full"


@dataclass(frozen=True)
class RunKeys:
    """The keys of everything a run holds, relative to its root."""

    spec: str = "spec.yaml"
    manifest: str = "manifest.json"
    events: str = "events.jsonl"
    trackers: str = "trackers.json"
    tensorboard: str = "tensorboard"
    lease: str = ".lease"
    checkpoints: str = "checkpoints"
    final: str = "final"
    adapter: str = "final/adapter"
    merged: str = "final/merged"
    final_complete: str = f"final/{COMPLETE}"
    eval: str = "eval"
    eval_metrics: str = "eval/metrics.json"
    eval_samples: str = "eval/samples.jsonl"
    eval_report: str = "eval/report.md"
    eval_plot: str = "eval/loss.png"
    exported: str = "exported"          # `kubetune export`: whole-model copies of sharded checkpoints
    reader_state: str = ".kubetune-read.json"  # a reader's copy: what it brought, by fingerprint (runs.run)
    model_config: str = "config.json"    # a whole-model folder's (what a run is not: see runs.run)

    # the files a run's working copy mirrors before anything else (spec, provenance, events, trackers)
    @property
    def run_files(self) -> tuple[str, ...]:
        return (self.spec, self.manifest, self.events, self.trackers)

    def checkpoint(self, step: int) -> str:
        return f"{self.checkpoints}/{CHECKPOINT_PREFIX}{step}"

    def earlier_spec(self, n: int) -> str:
        """Where a resumed run keeps the spec it ran with before its spec changed (spec.N.yaml)."""
        return f"spec.{n}.yaml"

    def checkpoint_complete(self, step: int) -> str:
        return f"{self.checkpoint(step)}/{COMPLETE}"

    def served(self, spec: RunSpec) -> str:
        """What this run serves (serves_merged)."""
        return self.merged if serves_merged(spec) else self.adapter


RUN_KEYS = RunKeys()


@dataclass(frozen=True)
class RunLayout:
    """The run's keys on a local root: a run folder, or the working copy of a remote run."""

    root: Path

    def path(self, key: str) -> Path:
        """The local path of a key. A key from a store is untrusted text (whatever wrote the bucket): one
        that would leave the run's folder is refused, never followed."""
        if Path(key).is_absolute() or ".." in Path(key).parts:
            raise UsageError(f"the run's storage holds {key!r}, which would land outside the run's folder",
                             "remove that object from the bucket (whatever wrote it was not kubetune)")
        return self.root / key

    @property
    def spec(self) -> Path:
        return self.root / RUN_KEYS.spec

    @property
    def manifest(self) -> Path:
        return self.root / RUN_KEYS.manifest

    @property
    def events(self) -> Path:
        return self.root / RUN_KEYS.events

    @property
    def trackers(self) -> Path:
        return self.root / RUN_KEYS.trackers

    @property
    def tensorboard(self) -> Path:
        return self.root / RUN_KEYS.tensorboard

    @property
    def lease(self) -> Path:
        return self.root / RUN_KEYS.lease

    @property
    def checkpoints(self) -> Path:
        return self.root / RUN_KEYS.checkpoints

    def checkpoint(self, step: int) -> Path:
        return self.root / RUN_KEYS.checkpoint(step)

    @property
    def final(self) -> Path:
        return self.root / RUN_KEYS.final

    @property
    def adapter(self) -> Path:
        return self.root / RUN_KEYS.adapter

    @property
    def merged(self) -> Path:
        return self.root / RUN_KEYS.merged

    @property
    def final_complete(self) -> Path:
        return self.root / RUN_KEYS.final_complete

    @property
    def eval(self) -> Path:
        return self.root / RUN_KEYS.eval

    @property
    def eval_metrics(self) -> Path:
        return self.root / RUN_KEYS.eval_metrics

    @property
    def eval_samples(self) -> Path:
        return self.root / RUN_KEYS.eval_samples

    @property
    def eval_report(self) -> Path:
        return self.root / RUN_KEYS.eval_report

    @property
    def eval_plot(self) -> Path:
        return self.root / RUN_KEYS.eval_plot

    def served(self, spec: RunSpec) -> Path:
        """The folder this run serves (serves_merged)."""
        return self.root / RUN_KEYS.served(spec)

    def is_finished(self) -> bool:
        return self.final_complete.exists()
