"""Checkpoints exist only once their COMPLETE marker is written, after every other file.

A process killed mid-save leaves a folder without the marker; resume ignores it and retention
removes it, so a half-written checkpoint can never be loaded.
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
    """(step, path, complete) for every checkpoint folder, oldest first."""
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir() if p.is_dir()]
    return sorted((s, p, (p / COMPLETE).exists()) for s, p in found if s is not None)


def latest_complete(folder: Path) -> Path | None:
    done = [p for _, p, ok in list_checkpoints(folder) if ok]
    return done[-1] if done else None


def mark_complete(path: Path, step: int) -> None:
    """Write the marker atomically (tmp + rename), after fsync-ing the checkpoint's files."""
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    tmp = path / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time()}))
    os.replace(tmp, path / COMPLETE)


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
    """Before resuming: a checkpoint without COMPLETE is garbage from a killed process."""
    removed = []
    for _, path, ok in list_checkpoints(folder):
        if not ok:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
