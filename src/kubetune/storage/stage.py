"""`kubetune stage`: deliver a base model and datasets to the storage a run will read them from.

Sources: the Hub (hf://org/name, hf://datasets/org/name), object storage, local paths, or a user's
Python script that writes JSONL. Idempotent: a file already at the destination with the same size
(and the same MD5, where the destination's ETag is one) is skipped, so a re-run after an
interruption copies only what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kubetune import settings
from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec
from kubetune.storage.fetch import excluded, fetch, matches
from kubetune.storage.store import Store, local_path
from kubetune.uris import bucket, scheme, uri_basename


@dataclass(frozen=True)
class Delivery:
    what: str                 # "model" | "data"
    dest: str
    source: str | None = None
    script: str | None = None
    args: tuple[str, ...] = ()


@dataclass
class StageReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_copied: int = 0

    def summary(self) -> str:
        return (f"copied {len(self.copied)} file(s) ({self.bytes_copied / 1e6:.1f} MB), "
                f"skipped {len(self.skipped)} identical")


def deliveries_from_spec(spec: RunSpec) -> list[Delivery]:
    out = []
    if spec.stage.model:
        out.append(Delivery("model", spec.model.base, spec.stage.model))
    sources = spec.data.sources()
    for i, d in enumerate(spec.stage.data):
        dest = d.to or sources[i].path
        out.append(Delivery("data", dest, d.source, d.script, tuple(d.args)))
    if not out:
        raise UsageError("the spec has nothing to stage (no stage.model, no stage.data)",
                         "add stage: {model: hf://org/name, data: [{source: hf://datasets/org/name}]}")
    return out


def deliveries_from_flags(models: Sequence[str], data: Sequence[str], to: str) -> list[Delivery]:
    to = to.rstrip("/")
    out = []
    for model in models:
        out.append(Delivery("model", f"{to}/models/{uri_basename(model)}", model))
    for d in data:
        out.append(Delivery("data", f"{to}/data/{uri_basename(d)}", d))
    if not out:
        raise UsageError("stage --to needs --model and/or --data", "e.g. kubetune stage --model hf://org/name --to s3://bucket/")
    return out


def stage(deliveries: Sequence[Delivery], exclude: Sequence[str] = (), log: Callable[[str], None] = print) -> StageReport:
    report = StageReport()
    for item in deliveries:  # before anything is fetched
        if scheme(item.dest) == "pvc" and not (settings.pvc_root() / bucket(item.dest)).is_dir():
            raise UsageError(f"{item.dest}: the claim {bucket(item.dest)} is mounted only in the cluster's pods "
                             f"(not at {settings.pvc_root()} here)",
                             "copy local files with `kubetune copy SRC pvc://CLAIM/PATH` (a data-access pod); "
                             "stage from the Hub in the cluster: kubetune render SPEC --what stage | "
                             "kubectl apply --server-side -f -")
    for item in deliveries:
        if item.script:
            log(f"{item.what}: running {item.script} → {item.dest}")
            with tempfile.TemporaryDirectory(prefix="kubetune-stage-") as tmp:
                produced = _run_script(item, Path(tmp))
                copy_tree(produced, item.dest, exclude, report, log, single=True)
            continue
        assert item.source is not None
        log(f"{item.what}: {item.source} → {item.dest}")
        local = fetch(item.source, exclude=exclude)
        copy_tree(local, item.dest, exclude, report, log, single=local.is_file())
    return report


def _run_script(item: Delivery, tmp: Path) -> Path:
    script = Path(item.script or "")
    if not script.is_file():
        raise UsageError(f"stage.data script {script}: no such file")
    name = uri_basename(item.dest) if item.dest.endswith((".jsonl", ".json", ".parquet", ".csv")) else "data.jsonl"
    output = tmp / name
    env = dict(os.environ, KUBETUNE_OUTPUT=str(output))
    res = subprocess.run([sys.executable, str(script), *item.args], env=env)
    if res.returncode != 0:
        raise UsageError(f"stage.data script {script} exited with {res.returncode}", "fix the script; nothing was copied")
    if not output.is_file() or output.stat().st_size == 0:
        raise UsageError(f"stage.data script {script} wrote nothing to $KUBETUNE_OUTPUT ({output})",
                         "the script must write its JSONL rows to the path in KUBETUNE_OUTPUT")
    return output


def copy_tree(local: Path, dest: str, exclude: Sequence[str], report: StageReport, log: Callable[[str], None],
              single: bool) -> None:
    if single:
        parent, _, name = dest.rstrip("/").rpartition("/")
        if not parent:
            parent, name = ".", dest
        files = {name: local}
        store = Store(parent)
    else:
        files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")}
        files = {k: v for k, v in files.items() if not excluded(k, exclude)}
        store = Store(dest)
    existing = store.find(name) if single else store.find()
    for key, path in files.items():
        if key in existing and matches(path, existing[key]):  # already there: a re-run resumes
            report.skipped.append(store.url(key))
            continue
        if not _link_into(store, path, key):
            store.put(path, key)
        report.copied.append(store.url(key))
        report.bytes_copied += path.stat().st_size
        log(f"  copied {key} ({path.stat().st_size / 1e6:.1f} MB)")




def deliveries(spec: RunSpec | None, models: Sequence[str], data: Sequence[str], to: str | None,
               exclude: Sequence[str] | None) -> tuple[list[Delivery], list[str]]:
    """What `kubetune stage` copies, and what it skips: from a spec's stage section, or from
    --model/--data with --to (not both)."""
    from kubetune.spec.models import StageSpec

    if spec is not None and (models or data or to):
        raise UsageError("give a SPEC, or --model/--data with --to, not both")
    if spec is not None:
        items = deliveries_from_spec(spec)
        return items, list(exclude if exclude is not None else spec.stage.exclude)
    if not to:
        raise UsageError("give a SPEC, or --model/--data with --to")
    return deliveries_from_flags(models, data, to), list(exclude if exclude is not None else StageSpec().exclude)


def _link_into(store: Store, path: Path, key: str) -> bool:
    """A local destination on the cache's filesystem gets a hard link, not a second copy: a serving
    pod stages models into the volume that also holds its download cache (one copy on the node's disk)."""
    root = local_path(store.uri)
    if root is None:
        return False
    target = root / key
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.unlink(missing_ok=True)
        os.link(path, target)
    except OSError:  # another filesystem (or mount): copied instead
        return False
    return True

