"""The reader's view of a run, a local folder or an object-storage prefix alike: its spec, typed
events, checkpoints, eval results and what it serves, read straight from where the run lives.

Nothing here writes, pulls into a working copy, deletes or takes the lease — a reader can look at a
run while its trainer writes it (docs/design.md, "Runs have one writer"). What cannot be read (not
written yet, storage unreachable for a moment) reads as absent: readers show what there is and ask
again later."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kubetune.artifacts.events import Event, parse_events
from kubetune.errors import KubetuneError
from kubetune.runs.checkpoints import CheckpointState, listing
from kubetune.runs.layout import RUN_KEYS
from kubetune.spec.models import RunSpec
from kubetune.storage.store import Store


@dataclass
class RunView:
    uri: str

    @cached_property
    def store(self) -> Store:
        return Store(self.uri)

    def text(self, key: str) -> str | None:
        """A file of the run by its key (RUN_KEYS), None when it is not there or not readable now."""
        try:
            return self.store.read_text(key) if self.store.exists(key) else None
        except (KubetuneError, OSError, UnicodeDecodeError):
            return None

    def exists(self, key: str) -> bool:
        try:
            return self.store.exists(key)
        except (KubetuneError, OSError):
            return False

    def spec_text(self) -> str | None:
        return self.text(RUN_KEYS.spec)

    def spec(self) -> RunSpec | None:
        """The resolved spec the run trained with; None before it is written or when it does not load."""
        from kubetune.spec.load import load_spec_text

        text = self.spec_text()
        if text is None:
            return None
        try:
            return load_spec_text(text, f"{self.uri}/{RUN_KEYS.spec}")
        except KubetuneError:
            return None

    def events(self) -> list[Event]:
        """The run's typed events, [] before the first one."""
        return parse_events((self.text(RUN_KEYS.events) or "").splitlines())

    def checkpoints(self) -> list[CheckpointState]:
        """Every checkpoint and its state (runs.checkpoints.listing); [] when none can be read."""
        try:
            return listing(self.store)
        except (KubetuneError, OSError):
            return []

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints whose files match their COMPLETE marker: a corrupted one is never offered."""
        return [c.step for c in self.checkpoints() if c.ok]

    def is_finished(self) -> bool:
        return self.exists(RUN_KEYS.final_complete)

    def served(self) -> str | None:
        """The key of what the run serves (runs.layout.serves_merged), None before its spec exists."""
        spec = self.spec()
        return RUN_KEYS.served(spec) if spec is not None else None

    def eval_metrics(self) -> dict[str, Any] | None:
        try:
            found = json.loads(self.text(RUN_KEYS.eval_metrics) or "null")
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def eval_samples(self, limit: int) -> list[dict[str, Any]]:
        out = []
        for line in (self.text(RUN_KEYS.eval_samples) or "").splitlines()[:limit]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def eval_report(self) -> str | None:
        return self.text(RUN_KEYS.eval_report)
