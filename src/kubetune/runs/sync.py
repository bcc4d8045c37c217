"""A run whose output is object storage (or a PVC): a local working copy, mirrored to the output URI.

The output URI is the source of truth. Before training, `pull` brings the run's files and its
newest complete checkpoint into an empty local folder (so any machine can resume); the trainer
holding the run's lease (and only it) deletes incomplete checkpoints from the store. While training, `Uploader` sends each checkpoint from a
background process — COMPLETE last, after every other file of it — retries with backoff while
the store is unreachable, and applies retention in the store too. The run ends after the queue
is drained; uploads that never succeeded are a clear error, and the local files stay.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from kubetune import settings
from kubetune.runs.checkpoints import beyond_retention, garbage_before_resume, listing, verify
from kubetune.runs.layout import COMPLETE, RUN_KEYS, RunLayout
from kubetune.errors import TransientError
from kubetune.storage.store import Store, local_path

def is_synced(uri: str) -> bool:
    """Outputs that need a local working copy: object storage. pvc:// is a mounted folder: written directly."""
    return local_path(uri) is None


def workdir_for(uri: str, name: str) -> Path:
    return settings.workdir() / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def marker_last(keys: Iterable[str]) -> list[str]:
    """Keys in order, COMPLETE markers after every other file: a reader that sees the marker sees all."""
    return sorted(keys, key=lambda k: (k.rsplit("/", 1)[-1] == COMPLETE, k))


@dataclass
class PullResult:
    checkpoint: int | None = None          # step of the checkpoint brought down
    removed_incomplete: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)   # marked COMPLETE, files not matching it


def pull(store: Store, layout: RunLayout, log: Callable[[str], None] = print, writer: bool = False) -> PullResult:
    """Make the local working copy agree with the store: run files, final/ when complete, and the
    newest complete checkpoint whose files match its marker.

    Only the run's writer (`writer=True`: the trainer, holding the run's lease) removes incomplete
    checkpoints from the store. A reader never deletes: what looks incomplete to it may be the
    checkpoint the live trainer is uploading at that moment."""
    result = PullResult()
    for name in RUN_KEYS.run_files:
        if store.exists(name):
            store.get(name, layout.path(name))
    if store.exists(RUN_KEYS.final_complete):
        for key in sorted(store.find(RUN_KEYS.final)):
            store.get(key, layout.path(key))
        return result
    found = listing(store)
    result.skipped = [(c.step, c.why or "") for c in found if c.state == "mismatch"]
    for step, why in result.skipped:
        log(f"checkpoint-{step} in {store.uri} is skipped: {why}")
    complete_steps = [c.step for c in found if c.ok]
    if writer:  # the writer's rule, the same as in a local folder
        for step in garbage_before_resume(found):
            store.remove(RUN_KEYS.checkpoint(step))
            result.removed_incomplete.append(step)
    if complete_steps:
        step = complete_steps[-1]
        local = layout.checkpoint(step)
        if not (local / COMPLETE).exists() or verify(local) is not None:
            for key in marker_last(store.find(RUN_KEYS.checkpoint(step))):
                store.get(key, layout.path(key))
        result.checkpoint = step
    if result.removed_incomplete:
        log(f"removed incomplete checkpoints from {store.uri}: {result.removed_incomplete}")
    return result


class Uploader:
    """Background uploads from the local working copy to the store, in order, with retries.

    The uploads run in a child process (kubetune.runs.upload_worker), not a thread: on a
    CPU-bound training loop an upload thread competes for the GIL (botocore signs, hashes and
    copies in Python), which measurably slowed steps; a niced child process does not. Jobs go
    to it as JSON lines on stdin, its reports come back on stdout. It dies with its parent.
    """

    def __init__(self, store: Store, layout: RunLayout, keep: int, retry_seconds: float | None = None,
                 log: Callable[[str], None] = print, on_stored: Callable[[int], None] | None = None) -> None:
        self.store, self.layout, self.keep, self.log = store, layout, keep, log
        self.on_stored = on_stored  # called (from the reader thread) when a checkpoint is complete in the store
        self.retry_seconds = retry_seconds if retry_seconds is not None else settings.upload_retry_seconds()
        self.failures: list[str] = []
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.runs.upload_worker", store.uri, str(layout.root), str(keep),
             str(self.retry_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, name="kubetune-upload-reports", daemon=True)
        self._reader.start()

    # -- called from the training loop (never blocks on the network) --
    def checkpoint(self, path: Path, step: int) -> None:
        with self._lock:
            self._pending.add(step)
        self._send({"kind": "checkpoint", "paths": [str(path)], "step": step})

    def files(self, *paths: Path) -> None:
        self._send({"kind": "files", "paths": [str(p) for p in paths]})

    def tree(self, folder: Path) -> None:
        """A folder whose COMPLETE (if any) must arrive last, like final/."""
        self._send({"kind": "tree", "paths": [str(folder)]})

    def pending_steps(self) -> set[int]:
        with self._lock:
            return set(self._pending)

    def wait_for_checkpoints(self, timeout: float | None = None) -> bool:
        """Block until every queued checkpoint is stored (or failed); False on timeout."""
        with self._settled:
            return self._settled.wait_for(lambda: not self._pending or self._proc.poll() is not None, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Wait for every queued upload; raise TrainingError if some never succeeded."""
        try:
            if self._proc.stdin:
                self._proc.stdin.close()  # end of jobs: the worker finishes the queue and exits
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self.failures.append(f"uploads still running after {timeout:.0f} s")
        self._reader.join(10)
        if self._proc.returncode not in (0, None) and not self.failures:
            self.failures.append(f"the upload process exited with {self._proc.returncode}")
        if self.failures:
            # The storage never came back within the retry window: an infrastructure failure, retried
            # by the Job (the local copy and the checkpoints already stored are intact).
            raise TransientError(
                f"uploading to {self.store.uri} failed: {'; '.join(self.failures[:5])}",
                f"the local copy is intact in {self.layout.root}; fix the storage and rerun the same command "
                "(resume: auto uploads and continues)")

    def _send(self, job: dict[str, Any]) -> None:
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self.failures.append(f"upload process gone ({type(exc).__name__})")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if report["kind"] == "log":
                self.log(report["message"])
            elif report["kind"] == "failure":
                self.failures.append(report["message"])
            if report["kind"] in ("done", "failure") and report.get("step") is not None:
                if report["kind"] == "done" and self.on_stored is not None:
                    self.on_stored(int(report["step"]))  # before it stops being pending: see wait_for_checkpoints
                with self._lock:
                    self._pending.discard(report["step"])
                    self._settled.notify_all()


@dataclass
class UploadJob:
    kind: str              # "checkpoint" | "files" | "tree"
    paths: list[Path]
    step: int | None = None


class UploadWorker:
    """Runs in the upload process: one job at a time, COMPLETE last, retention, retries."""

    def __init__(self, store: Store, root: Path, keep: int, retry_seconds: float,
                 log: Callable[[str], None]) -> None:
        self.store, self.root, self.keep, self.retry_seconds, self.log = store, root, keep, retry_seconds, log

    def run(self, job: UploadJob) -> None:
        if job.kind == "checkpoint":
            self._upload_tree(job.paths[0])
            self._retention()
        elif job.kind == "tree":
            self._upload_tree(job.paths[0])
        else:
            for path in job.paths:
                if path.exists():
                    self._retry(lambda p=path: self.store.put(p, self._key(p)), self._key(path))

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _upload_tree(self, folder: Path) -> None:
        if not folder.exists():
            return
        files = [self._key(p) for p in folder.rglob("*") if p.is_file() and not _scratch(p)]
        for key in marker_last(files):
            self._retry(lambda k=key: self.store.put(self.root / k, k), key)

    def _retention(self) -> None:
        """Keep the newest `keep` complete checkpoints in the store; never the newest complete one. A
        checkpoint older than that whose files do not match its marker (a removal that was cut short)
        goes too."""
        found = self._retry(lambda: listing(self.store), RUN_KEYS.checkpoints)
        for step in beyond_retention(found, self.keep):  # the local folder's rule too
            self._retry(lambda s=step: self.store.remove(RUN_KEYS.checkpoint(s)), RUN_KEYS.checkpoint(step))

    def _retry(self, action: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay, warned = 0.5, False
        while True:
            try:
                result = action()
                if warned:
                    self.log(f"storage reachable again: {self.store.url(what)} uploaded")
                return result
            except Exception as exc:  # noqa: BLE001 - every failure is retried until the deadline
                if time.monotonic() + delay > deadline:
                    raise GaveUp(f"{self.store.url(what)}: {_short(exc)} (gave up after {self.retry_seconds:.0f} s)") from exc
                if not warned:
                    self.log(f"upload of {self.store.url(what)} failed ({_short(exc)}); retrying with backoff")
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def _scratch(path: Path) -> bool:
    """Files being written (ours and other writers' `.tmp` before a rename), never uploaded. Other dot
    files are data: a sharded checkpoint's `.metadata` is what makes its shards loadable."""
    return path.name.endswith(".tmp") or path.name.startswith(".nfs")


class GaveUp(Exception):
    pass


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]

