"""`kubetune copy`: files between this machine and a PVC, through a short-lived data-access pod
(render/data_access.py) reached over the API server's pod proxy — workflow C's "copy the data in,
the results out" without kubectl cp, a privileged pod or a bucket.

Idempotent like `stage`: a file already at the destination with the same size is skipped, so a copy
that was interrupted continues with what is missing; files arrive under a temporary name and are
renamed when whole. The pod and its token's Secret are deleted whatever happens; the token is never
printed or written anywhere but the Secret."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from kubetune.errors import TransientError, UsageError
from kubetune.k8s.client import Cluster, pull_failure, unschedulable
from kubetune.k8s.render.data_access import PORT, TOKEN_KEY, data_access_pod
from kubetune.spec.models import KubernetesSpec
from kubetune.storage.stage import StageReport
from kubetune.uris import body, scheme

PART = ".kubetune-part"
CHUNK = 1 << 20


def claim_and_path(uri: str) -> tuple[str, str]:
    claim, _, rel = body(uri).partition("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not claim or ".." in parts:
        raise UsageError(f"{uri}: expected pvc://CLAIM/path (without ..)")
    return claim, "/".join(parts)


def local_files(src: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of a file or a folder's regular files; symlinks are not followed."""
    if src.is_file():
        return [("", src)]
    if not src.is_dir():
        raise UsageError(f"{src}: no such file or folder")
    out = []
    for folder, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink() and not name.endswith(PART):
                out.append((path.relative_to(src).as_posix(), path))
    return out


def safe_join(root: Path, rel: str) -> Path:
    """A path the pod listed, under root (the volume's contents are not trusted to stay inside it)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts:
        raise UsageError(f"the volume lists {rel!r}, which would land outside {root}")
    return root.joinpath(*parts) if parts else root


class PodFiles:
    """The data-access pod's file routes through the API server's pod proxy."""

    def __init__(self, cluster: Cluster, pod: str, token: str) -> None:
        self.cluster, self.token = cluster, token
        self.base = f"/api/v1/namespaces/{cluster.namespace}/pods/{pod}:{PORT}/proxy"

    def _call(self, method: str, route: str, rel: str = "", body: Any = None,
              headers: dict[str, str] | None = None) -> Any:
        query = {"path": rel} if route != "healthz" else {}
        return self.cluster.stream(method, f"{self.base}/{route}", query,
                                   {"X-Kubetune-Token": self.token, **(headers or {})}, body)

    def healthy(self) -> bool:
        response = self._call("GET", "healthz")
        try:
            if response.status == 403:
                raise UsageError(f"forbidden: get pods/proxy in namespace {self.cluster.namespace}",
                                 "ask for the pods/proxy verbs (get, update) in the namespace; `kubetune setup` grants them")
            return bool(response.status == 200)
        finally:
            response.release_conn()

    def listing(self, rel: str) -> list[tuple[str, int]] | None:
        response = self._call("GET", "list", rel)
        try:
            data = response.read()
            if response.status == 404:
                return None
            self._check(response.status, data, rel)
            return [(str(p), int(size)) for p, size in json.loads(data)["files"]]
        finally:
            response.release_conn()

    def get(self, rel: str, dest: Path, size: int) -> None:
        response = self._call("GET", "file", rel)
        try:
            if response.status != 200:
                self._check(response.status, response.read(), rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + PART)
            got = 0
            with part.open("wb") as f:
                for chunk in response.stream(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
            if got != size:
                part.unlink()
                raise TransientError(f"{rel}: the pod sent {got:,} of {size:,} bytes",
                                     "run the same copy again: whole files are kept, the rest is copied")
            os.replace(part, dest)
        finally:
            response.release_conn()

    def put(self, rel: str, src: Path) -> int:
        size = src.stat().st_size
        with src.open("rb") as f:
            response = self._call("PUT", "file", rel, f, {"Content-Length": str(size),
                                                          "Content-Type": "application/octet-stream"})
        try:
            self._check(response.status, response.read(), rel)
        finally:
            response.release_conn()
        return size

    def _check(self, status: int, data: bytes, rel: str) -> None:
        if status < 300:
            return
        try:
            why = json.loads(data).get("error") or json.loads(data).get("message")
        except (ValueError, AttributeError):
            why = data[:200].decode(errors="replace")
        if status in (400, 403, 404):
            raise UsageError(f"the data-access pod refused {rel or '/'}: {why} (HTTP {status})")
        raise TransientError(f"the data-access pod failed on {rel or '/'}: {why} (HTTP {status})",
                             "run the same copy again: whole files are kept, the rest is copied")


def copy(cluster: Cluster, k: KubernetesSpec, src: str, dst: str, timeout: float = 300.0, poll: float = 1.0,
         say: Callable[[str], None] = print) -> StageReport:
    """Copy a local file or folder onto pvc://CLAIM/PATH, or pvc://CLAIM/PATH into a local folder."""
    into = scheme(dst) == "pvc"
    if into == (scheme(src) == "pvc") or scheme(dst if not into else src) not in (None, "file"):
        raise UsageError(f"kubetune copy {src} {dst}: one side must be pvc://CLAIM/path and the other a local path",
                         "e.g. kubetune copy ./data pvc://shared-data/datasets, "
                         "kubetune copy pvc://shared-data/runs/NAME ./runs/NAME")
    claim, rel = claim_and_path(dst if into else src)
    local = Path(body(src if into else dst))
    if into:
        files = local_files(local)  # before any pod: a missing source costs nothing
    name = f"kubetune-copy-{secrets.token_hex(4)}"
    token = secrets.token_urlsafe(32)
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": name, "namespace": k.namespace,
                           "labels": {"app.kubernetes.io/managed-by": "kubetune",
                                      "app.kubernetes.io/component": "data-access"}},
              "stringData": {TOKEN_KEY: token}}
    pod = data_access_pod(k, claim, name, name)
    ns = cluster.namespace
    cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets", secret)
    try:
        cluster.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)
        say(f"data-access pod {name} started with pvc {claim} mounted")
        remote = PodFiles(cluster, name, token)
        _wait(cluster, remote, name, pod["spec"]["containers"][0]["image"], timeout, poll)
        report = StageReport()
        if into:
            listing = remote.listing(rel)
            if files[0][0] == "" and (dst.endswith("/") or _is_folder(listing)):
                rel = "/".join(p for p in (rel, files[0][1].name) if p)  # a file into a folder keeps its name
                listing = remote.listing(rel)
            have = dict(listing or [])
            for sub, path in files:
                target = "/".join(p for p in (rel, sub) if p)
                if have.get(sub) == path.stat().st_size:
                    report.skipped.append(target)
                    continue
                report.bytes_copied += remote.put(target, path)
                report.copied.append(target)
        else:
            listing = remote.listing(rel)
            if listing is None:
                raise UsageError(f"{src} does not exist on the volume", f"list it: kubetune copy pvc://{claim} ./{claim}")
            single = not _is_folder(listing)
            if not single and local.is_file():
                raise UsageError(f"{src} is a folder and {local} a file", f"copy it into a folder: kubetune copy {src} "
                                 f"{local.parent / Path(rel).name}")
            for sub, size in listing:
                dest = safe_join(local, sub) if not single else (
                    local / Path(rel).name if local.is_dir() else local)
                if dest.is_file() and dest.stat().st_size == size:
                    report.skipped.append(str(dest))
                    continue
                remote.get("/".join(p for p in (rel, sub) if p), dest, size)
                report.bytes_copied += size
                report.copied.append(str(dest))
        return report
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", tolerate=(404,))
        cluster.request("DELETE", f"/api/v1/namespaces/{ns}/secrets/{name}", tolerate=(404,))


def _is_folder(listing: list[tuple[str, int]] | None) -> bool:
    return listing is not None and not (len(listing) == 1 and listing[0][0] == "")


def _wait(cluster: Cluster, remote: PodFiles, name: str, image: str, timeout: float, poll: float) -> None:
    """Until the pod's server answers, or the pod cannot start (its image, its volume), or time is up."""
    path = f"/api/v1/namespaces/{cluster.namespace}/pods/{name}"
    deadline = time.monotonic() + timeout
    while True:
        found = cluster.request("GET", path, tolerate=(404,))
        status = found[1].get("status") or {} if not isinstance(found, int) else {}
        pulling = pull_failure(status)
        if pulling:
            raise UsageError(f"the cluster cannot pull {image} for the data-access pod ({pulling['reason']}: "
                             f"{pulling.get('message', '')})",
                             "let the nodes reach the image's registry, or set kubernetes.image (--spec) to an "
                             "image your registry serves")
        if status.get("phase") in ("Succeeded", "Failed"):
            log = "".join(cluster.log(name, tail=20))
            raise UsageError(f"the data-access pod {name} ended before the copy ({status['phase']}): {log.strip()}")
        if status.get("phase") == "Running" and remote.healthy():
            return
        if time.monotonic() > deadline:
            placing = unschedulable(status)
            why = f" (unschedulable: {placing})" if placing is not None else ""
            raise TransientError(f"the data-access pod {name} was not serving after {timeout:.0f} s{why}",
                                 f"kubectl -n {cluster.namespace} describe pod {name}; is the PVC bound, and "
                                 "ReadWriteMany if a running pod holds it?")
        time.sleep(poll)
