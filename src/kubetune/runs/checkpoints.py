"""Checkpoints exist only once their COMPLETE marker is written, after every other file.

A process killed mid-save leaves a folder without the marker; resume ignores it and the run's
writer removes it, so a half-written checkpoint can never be loaded. The marker lists every file of
the checkpoint with its size: a checkpoint whose files do not match it (a file removed or truncated
after it was written, an upload that lost a file) is skipped and reported, never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from kubetune.runs.layout import CHECKPOINT_PREFIX, COMPLETE, RUN_KEYS
from kubetune.storage.store import Store

_CKPT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


class CheckpointState(NamedTuple):
    """One checkpoint as a listing sees it: "ok" (marker there, files match it), "unmarked" (no
    COMPLETE: a save in progress or killed) or "mismatch" (marked, files do not match: `why`)."""

    step: int
    state: str
    why: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def listing(store: Store, under: str = RUN_KEYS.checkpoints) -> list[CheckpointState]:
    """The one checkpoint lister, for a local folder and an object-storage prefix alike (a Store of
    either): every checkpoint under `under`, oldest first. One recursive listing gives every file's
    size; only the markers are read."""
    sizes: dict[int, dict[str, int]] = {}
    base = f"{under}/" if under else ""
    for key, info in store.find(under).items():
        name, _, rest = key[len(base):].partition("/")
        step = checkpoint_step(Path(name))
        if step is not None and rest:
            sizes.setdefault(step, {})[rest] = int(info.get("size") or info.get("Size") or 0)
    for name in store.listdir(under):  # a folder a killed save left empty (a local disk keeps those)
        step = checkpoint_step(Path(name))
        if step is not None:
            sizes.setdefault(step, {})
    out = []
    for step, files in sorted(sizes.items()):
        if COMPLETE not in files:
            out.append(CheckpointState(step, "unmarked"))
            continue
        why = mismatch(store.read_text(f"{base}{CHECKPOINT_PREFIX}{step}/{COMPLETE}"), files)
        out.append(CheckpointState(step, "ok" if why is None else "mismatch", why))
    return out


def folder_listing(folder: Path) -> list[CheckpointState]:
    """`listing` of a local checkpoints folder (RUN/checkpoints)."""
    return listing(Store(str(folder)), "") if folder.is_dir() else []


def list_checkpoints(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint folder, oldest first; complete means its marker
    is there and its files match it."""
    return [(c.step, folder / f"{CHECKPOINT_PREFIX}{c.step}", c.ok) for c in folder_listing(folder)]


def skipped(folder: Path) -> list[tuple[int, str]]:
    """(step, why) of the checkpoints whose marker is there but whose files do not match it."""
    return [(c.step, c.why or "") for c in folder_listing(folder) if c.state == "mismatch"]


def latest_complete(folder: Path) -> Path | None:
    done = [p for _, p, ok in list_checkpoints(folder) if ok]
    return done[-1] if done else None


def mark_complete(path: Path, step: int) -> None:
    """Write the marker atomically (tmp + rename), after fsync-ing the checkpoint's files; it lists
    each file (relative path) with its size."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != COMPLETE and not f.name.endswith(".tmp"):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
            files[f.relative_to(path).as_posix()] = f.stat().st_size
    tmp = path / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "files": files}))
    os.replace(tmp, path / COMPLETE)


def mismatch(marker: str, sizes: dict[str, int]) -> str | None:
    """Why a checkpoint's files (relative path → size) do not match its COMPLETE marker's text, or
    None when they do. A marker from before markers listed files proves nothing more than itself."""
    try:
        listed = json.loads(marker).get("files")
    except (ValueError, AttributeError):
        return "its COMPLETE marker is not readable"
    if listed is None:
        return None
    for name, size in listed.items():
        have = sizes.get(name)
        if have is None:
            return f"{name} is missing"
        if have != size:
            return f"{name} has {have:,} bytes, COMPLETE says {size:,}"
    return None


def verify(path: Path) -> str | None:
    try:
        marker = (path / COMPLETE).read_text()
    except OSError:
        return "no COMPLETE marker"
    sizes = {f.relative_to(path).as_posix(): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    return mismatch(marker, sizes)


# The run writer's two rules, for a local folder and a store alike, over a `listing`.

def garbage_before_resume(found: list[CheckpointState]) -> list[int]:
    """Before resuming: a checkpoint without COMPLETE is what a killed save left, and one whose files do
    not match its marker but is older than a valid one is what a killed retention left half-deleted. A
    newest one that does not match is kept (skipped, for a person to look at): no valid checkpoint after
    it says it is garbage."""
    valid = [c.step for c in found if c.ok]
    return [c.step for c in found if c.state == "unmarked" or (c.state == "mismatch" and valid and c.step < valid[-1])]


def beyond_retention(found: list[CheckpointState], keep: int, protect: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """After a checkpoint is saved: keep the newest `keep` complete ones (never fewer than the newest);
    anything older that is not complete goes too. `protect`: steps to keep whatever they are."""
    complete = [c.step for c in found if c.ok]
    if not complete:
        return []
    kept = set(complete[-max(1, keep):])
    return [c.step for c in found if c.step not in protect and c.step not in kept and (c.ok or c.step < complete[-1])]


def _remove(folder: Path, steps: list[int]) -> list[Path]:
    removed = []
    for step in steps:
        path = folder / f"{CHECKPOINT_PREFIX}{step}"
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def prune(folder: Path, keep: int, protect: set[int] | frozenset[int] = frozenset()) -> list[Path]:
    """Retention in a local folder (beyond_retention), by the run's writer."""
    return _remove(folder, beyond_retention(folder_listing(folder), keep, protect))


def remove_incomplete(folder: Path) -> list[Path]:
    """Before resuming in a local folder (garbage_before_resume), by the run's writer only."""
    return _remove(folder, garbage_before_resume(folder_listing(folder)))
