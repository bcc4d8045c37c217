"""Where a run lives: a local folder, a PVC mount, or object storage mirrored by a local working copy."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubetune.artifacts.layout import RunLayout
from kubetune.errors import UsageError
from kubetune.spec.models import RunSpec
from kubetune.storage.store import Store, local_path
from kubetune.storage.sync import Uploader, is_synced, pull, workdir_for


@dataclass
class RunOutput:
    uri: str
    layout: RunLayout            # always local: the run folder, or the working copy of a remote run
    store: Store | None = None   # the remote side, None when the run is written in place

    def remote(self, path: Path) -> str:
        """The URI of a file of the working copy (the local path when the run is local)."""
        if self.store is None:
            return str(path)
        return self.store.url(path.relative_to(self.layout.root).as_posix())


def apply_storage_env(spec: RunSpec) -> None:
    """Non-secret storage settings from the spec reach botocore (and torchrun ranks) through its own
    environment variables; credentials stay in the AWS chain and are never read here."""
    st = spec.storage
    for value, name in ((st.endpoint_url, "AWS_ENDPOINT_URL"), (st.region, "AWS_DEFAULT_REGION"), (st.profile, "AWS_PROFILE")):
        if value:
            os.environ.setdefault(name, value)


def run_output(spec: RunSpec) -> RunOutput:
    uri = spec.output_uri
    if is_synced(uri):
        return RunOutput(uri, RunLayout(workdir_for(uri, spec.name)), Store(uri))
    path = local_path(uri)
    assert path is not None
    return RunOutput(uri, RunLayout(path))


def open_any_run(run: str) -> RunOutput:
    """An existing run by folder or URI (for eval, merge, serve, chat, push). A remote run's spec,
    final/ and eval/ are brought into its working copy first."""
    path = local_path(run)
    if path is not None:
        layout = RunLayout(path)
        if not layout.spec.exists():
            raise UsageError(f"{run} is not a kubetune run folder (no spec.yaml)", "pass runs/NAME of a trained run")
        return RunOutput(run, layout)
    store = Store(run)
    if not store.exists("spec.yaml"):
        store.check_readable("run")
        raise UsageError(f"{run} is not a kubetune run (no spec.yaml there)", "pass the output URI of a trained run")
    name = run.rstrip("/").rsplit("/", 1)[-1]
    layout = RunLayout(workdir_for(run, name))
    pull(store, layout, log=lambda _m: None)
    for key in sorted(store.find("eval")):
        store.get(key, layout.root / key)
    return RunOutput(run, layout, store)


def publish(output: RunOutput, folder: Path) -> None:
    """Upload a folder of the working copy (eval/, final/merged) and wait: the verb ends when it is stored."""
    if output.store is None or not folder.exists():
        return
    uploader = Uploader(output.store, output.layout, keep=1)
    uploader.tree(folder)
    uploader.files(output.layout.events)
    uploader.close()
