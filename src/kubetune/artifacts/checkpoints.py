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

from kubetune.artifacts.layout import COMPLETE

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint folder, oldest first; complete means its marker
    is there and its files match it."""
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir() if p.is_dir()]
    return sorted((s, p, (p / COMPLETE).exists() and verify(p) is None) for s, p in found if s is not None)


def skipped(folder: Path) -> list[tuple[int, str]]:
    """(step, why) of the checkpoints whose marker is there but whose files do not match it."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        step = checkpoint_step(p)
        if step is not None and (p / COMPLETE).exists():
            why = verify(p)
            if why is not None:
                out.append((step, why))
    return sorted(out)


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


def prune(folder: Path, keep: int, protect: set[int] | frozenset[int] = frozenset()) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints; delete older ones and incomplete leftovers
    older than the newest complete one (never the newest complete itself)."""
    ckpts = list_checkpoints(folder)
    complete = [(s, p) for s, p, ok in ckpts if ok]
    if not complete:
        return []
    newest = complete[-1][0]
    keep_steps = {s for s, _ in complete[-max(1, keep):]}
    removed = []
    for step, path, ok in ckpts:
        if step in protect:
            continue
        if (ok and step not in keep_steps) or (not ok and step < newest):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_incomplete(folder: Path) -> list[Path]:
    """Before resuming (the run's writer only): a checkpoint without COMPLETE is garbage from a killed
    save, and one whose files do not match its marker but is older than a valid one is what a killed
    retention left half-deleted. A newest one that does not match is kept (skipped, for a person to
    look at): no valid checkpoint after it says it is garbage."""
    ckpts = list_checkpoints(folder)
    valid = [s for s, _, ok in ckpts if ok]
    removed = []
    for step, path, ok in ckpts:
        if not ok and (not (path / COMPLETE).exists() or (valid and step < valid[-1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
