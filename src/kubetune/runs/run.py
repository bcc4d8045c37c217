"""A run, wherever it lives: a local folder, a PVC mount, or object storage mirrored by a local
working copy. Every verb that takes RUN (eval, merge, serve, chat, push, sweep status) opens it
with `Run.open`; training gets its own with `Run.for_spec`."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.artifacts.events import Event, read_events
from kubetune.runs.layout import RUN_KEYS, RunLayout
from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec
from kubetune.storage.store import Store, local_path
from kubetune.uris import uri_basename
from kubetune.runs.sync import Uploader, is_synced, workdir_for


@dataclass(frozen=True)
class FinalModel:
    """What a run trained, ready to load: a whole model folder (merged, or a full fine-tune) or an
    adapter on its base. Either folder carries the tokenizer, the training chat template and the
    generation config that stops at its end-of-turn token."""

    folder: Path
    merged: bool
    base: str                 # model.base URI of the run
    revision: str | None

    @property
    def adapter(self) -> Path | None:
        return None if self.merged else self.folder


def is_model_folder(target: str) -> bool:
    """A local whole-model folder (config.json) that is not a kubetune run (spec.yaml): the one test of
    "run or model folder?" for local paths; read_run_spec answers it for any URI."""
    path = local_path(target)
    return path is not None and (path / RUN_KEYS.model_config).exists() and not (path / RUN_KEYS.spec).exists()


def read_run_spec(uri: str) -> RunSpec | None:
    """The resolved spec a run trained with (its spec.yaml), read without fetching anything else;
    None for a model folder (config.json and no spec.yaml)."""
    from kubetune.spec.load import load_spec, load_spec_text

    path = local_path(uri)
    if path is not None:
        if (path / RUN_KEYS.spec).exists():
            return load_spec(path / RUN_KEYS.spec)
        if (path / RUN_KEYS.model_config).exists():
            return None
        raise UsageError(f"{uri}: neither a kubetune run (spec.yaml) nor a model folder (config.json)",
                         "pass the output URI of a trained run, a model folder or hf://org/name")
    store = Store(uri)
    if store.exists(RUN_KEYS.spec):
        return load_spec_text(store.read_text(RUN_KEYS.spec), f"{uri}/{RUN_KEYS.spec}")
    if store.exists(RUN_KEYS.model_config):
        return None
    store.check_readable("run")
    raise UsageError(f"{uri}: neither a kubetune run (spec.yaml) nor a model folder (config.json)",
                     "pass the output URI of a trained run, a model folder or hf://org/name")


def model_folder_name(uri: str) -> str:
    """The name a whole-model folder is served under: the run's, for the merge a run wrote
    (RUN/final/merged — served by naming it: runs.layout.serves_merged), else the folder's."""
    stripped = uri.rstrip("/")
    if stripped.endswith(f"/{RUN_KEYS.merged}"):
        try:
            owner = read_run_spec(stripped.removesuffix(f"/{RUN_KEYS.merged}"))
        except UsageError:
            owner = None
        if owner is not None:
            return owner.name
    return uri_basename(stripped)


@dataclass
class Run:
    uri: str
    layout: RunLayout            # always local: the run folder, or the working copy of a remote run
    store: Store | None = None   # the remote side, None when the run is written in place
    spec: RunSpec | None = None  # the resolved spec (spec.yaml); None only before a first training wrote it

    @classmethod
    def for_spec(cls, spec: RunSpec) -> Run:
        """Where a spec's run is written (not read: nothing is fetched)."""
        uri = spec.output_uri
        if is_synced(uri):
            return cls(uri, RunLayout(workdir_for(uri, spec.name)), Store(uri), spec)
        path = local_path(uri)
        assert path is not None
        return cls(uri, RunLayout(path), None, spec)

    @classmethod
    def open(cls, uri: str) -> Run:
        """An existing run by folder or URI, for a verb that loads what it trained. A remote run's own
        files (spec, manifest, events, trackers) and eval/ are brought into a reader's copy; weights only
        when asked for (`materialise`, `final_model`). Nothing in the store is changed."""
        from kubetune.spec.load import load_spec

        path = local_path(uri)
        if path is not None:
            layout = RunLayout(path)
            if not layout.spec.exists():
                raise UsageError(f"{uri} is not a kubetune run folder (no spec.yaml)", "pass runs/NAME of a trained run")
            return cls(uri, layout, None, load_spec(layout.spec))
        store = Store(uri)
        if not store.exists(RUN_KEYS.spec):
            store.check_readable("run")
            raise UsageError(f"{uri} is not a kubetune run (no spec.yaml there)", "pass the output URI of a trained run")
        # A reader's own copy, never the trainer's working copy of the same run on this machine.
        layout = RunLayout(workdir_for(uri, f"{uri_basename(uri)}-read"))
        for key in RUN_KEYS.run_files:
            if store.exists(key):
                store.get(key, layout.path(key))
        opened = cls(uri, layout, store, load_spec(layout.spec))
        opened.materialise(RUN_KEYS.eval)
        return opened

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else self.layout.root.name

    def final_model(self, merged_if_present: bool = False) -> FinalModel:
        """What the run serves (runs.layout.serves_merged: a full fine-tune's final/merged, else
        final/adapter on the base); `merged_if_present`: a LoRA run's merge when it has one (what
        `push` publishes)."""
        assert self.spec is not None
        key = RUN_KEYS.served(self.spec)
        if merged_if_present and self._has(f"{RUN_KEYS.merged}/{RUN_KEYS.model_config}"):
            key = RUN_KEYS.merged
        folder = self.materialise(key)
        if not (folder / "tokenizer_config.json").exists():
            raise UsageError(f"{self.uri} has no trained model yet (no {folder})", "run `kubetune train` first")
        return FinalModel(folder, folder == self.layout.merged, self.spec.model.base, self.spec.model.revision)

    def materialise(self, key: str) -> Path:
        """A folder of the run (a RUN_KEYS key) as a local path. A remote run's is brought into this
        reader's copy — only that folder, and of final/ only once final/COMPLETE is stored (every file
        of it is then there). A file is kept only while the store's fingerprint of it (ETag or hash, size,
        time) is the one it was fetched with; anything else in the copy's folder is removed: a run
        deleted and trained again under the same URI never serves its predecessor's weights."""
        local = self.layout.path(key)
        if self.store is None:
            return local
        if key.startswith(RUN_KEYS.final) and not self.store.exists(RUN_KEYS.final_complete):
            shutil.rmtree(local, ignore_errors=True)  # still training: nothing final here, and no leftover
            return local
        state_file = self.layout.path(RUN_KEYS.reader_state)
        try:
            fetched: dict[str, str] = json.loads(state_file.read_text())
        except (OSError, ValueError):
            fetched = {}
        stored = self.store.find(key)
        for name, info in sorted(stored.items()):
            mark = _fingerprint(info)
            have = self.layout.path(name)
            if not (have.exists() and fetched.get(name) == mark):
                self.store.get(name, have)
                fetched[name] = mark
        if local.is_dir():
            for extra in [p for p in local.rglob("*") if p.is_file()]:
                if extra.relative_to(self.layout.root).as_posix() not in stored:
                    extra.unlink()
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_name(f"{state_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fetched))
        os.replace(tmp, state_file)  # two readers of one URI share this copy: neither reads half a file
        return local

    def _has(self, key: str) -> bool:
        return self.layout.path(key).exists() if self.store is None else self.store.exists(key)

    def events(self) -> list[Event]:
        return read_events(self.layout.events)

    def remote(self, path: Path) -> str:
        """The URI of a file of the working copy (the local path when the run is local)."""
        if self.store is None:
            return str(path)
        return self.store.url(path.relative_to(self.layout.root).as_posix())

    def where(self, path: Path) -> str | Path:
        """How to tell a user where a file of the run is: its URI for a remote run, else the path."""
        return self.remote(path) if self.store is not None else path

    def publish(self, folder: Path) -> None:
        """Upload a folder of the working copy (eval/, final/merged) and this verb's events, and wait: a
        verb that writes into a remote run ends when it is stored. It writes as the run's one writer —
        under its lease (waiting for a trainer still finishing) — and appends its events to the stored
        log as it is then, never replacing it with this copy's (which may miss the trainer's last lines)."""
        if self.store is None or not folder.exists():
            return
        import sys

        from kubetune import settings
        from kubetune.runs.lease import lease_for

        # a holder name of its own: never mistaken for a trainer that shares this host's or pod's name
        lease = lease_for(self.uri, self.store, f"{settings.lease_holder()}/publish", settings.lease_seconds(),
                          lambda line: print(line, file=sys.stderr))
        lease.acquire(wait=True)
        try:
            uploader = Uploader(self.store, self.layout, keep=1)
            uploader.tree(folder)
            uploader.close()
            self._append_events()
        finally:
            lease.release()

    def _append_events(self) -> None:
        key = self.layout.events.name
        mine = self.layout.events.read_text().splitlines() if self.layout.events.exists() else []
        stored = self.store.read_text(key) if self.store is not None and self.store.exists(key) else ""
        seen = set(stored.splitlines())
        new = [line for line in mine if line.strip() and line not in seen]  # each line has its own timestamp
        if new and self.store is not None:
            head = stored if not stored or stored.endswith("\n") else stored + "\n"
            self.store.write_text(key, head + "\n".join(new) + "\n")


def _fingerprint(info: dict[str, Any]) -> str:
    """What identifies a stored file's content, from the listing alone (S3: ETag; GCS: md5Hash and
    generation; then size and modification time)."""
    return "|".join(str(info.get(k)) for k in ("ETag", "etag", "md5Hash", "generation", "size", "Size",
                                                 "LastModified", "updated", "mtime"))


def apply_storage_env(spec: RunSpec) -> None:
    """Non-secret storage settings from the spec reach botocore (and torchrun ranks) through its own
    environment variables; credentials stay in the AWS chain and are never read here."""
    st = spec.storage
    for value, name in ((st.endpoint_url, "AWS_ENDPOINT_URL"), (st.region, "AWS_DEFAULT_REGION"), (st.profile, "AWS_PROFILE")):
        if value:
            os.environ.setdefault(name, value)


def remove_run(uri: str, holder: str = "kubetune-delete") -> None:
    """Delete a finished run, as its writer: the lease is taken first (LeaseHeld if a trainer still
    writes it; never waited for), everything but the lease removed, then the lease released and the
    emptied prefix removed. A reader's working copies elsewhere are theirs."""
    from kubetune import settings
    from kubetune.runs.lease import LEASE, lease_for

    path = local_path(uri)
    store = Store(uri)
    if path is not None and not path.exists():
        return
    lease = lease_for(uri, None if path is not None else store, holder, settings.lease_seconds(), lambda _: None)
    lease.acquire(wait=False)
    try:
        if path is not None:
            for child in path.iterdir():
                if child.name != LEASE:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            for key in list(store.find()):
                if key != LEASE:
                    store.remove(key)
    finally:
        lease.release()
    if path is not None:
        (path / LEASE).unlink(missing_ok=True)
        path.rmdir()
    else:
        store.remove("")
