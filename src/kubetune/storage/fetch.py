"""Inputs named by URI (a model folder or dataset in S3/GCS/Hub/PVC) → a local folder.

transformers and the data readers need local files. Remote files land in a content-addressed
blob store ($KUBETUNE_CACHE/objects/blobs/<id>, id = the store's ETag/hash plus size) and are
hard-linked into a per-URI tree; a file whose remote size and ETag match a blob is not downloaded
again. Each download is checked against the size and, where the ETag is an MD5 (single-part S3
uploads), against the MD5 of the bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from kubetune import settings
from kubetune.errors import UsageError
from kubetune.storage.store import Store, local_path

_MD5 = re.compile(r"^[0-9a-f]{32}$")


def cache_root() -> Path:
    return settings.cache_dir() / "objects"


def identity(info: dict[str, Any]) -> str:
    """What identifies a remote file's content without reading it: ETag/hash + size."""
    lfs = info.get("lfs") or {}
    tag = (info.get("ETag") or info.get("etag") or info.get("md5Hash") or lfs.get("sha256") or info.get("blob_id")
           or info.get("sha256") or "")
    tag = str(tag).strip('"')
    return f"{tag}-{size_of(info)}"


def size_of(info: dict[str, Any]) -> int:
    return int(info.get("size") or info.get("Size") or 0)


def matches(path: Path, info: dict[str, Any]) -> bool:
    """A local file holds what `info` describes: the same size, and the same MD5 where the ETag is one
    (single-part S3 uploads; multipart ETags and other stores are compared by size)."""
    if path.stat().st_size != size_of(info):
        return False
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return not _MD5.match(etag) or md5_of(path) == etag


def excluded(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(key, p) for p in patterns)


def fetch(uri: str, exclude: Sequence[str] = (),
          on_file: Callable[[str, bool], None] | None = None, include: Sequence[str] = ()) -> Path:
    """Local path holding the files of `uri` (itself when local). `on_file(key, downloaded)` reports
    progress; `include` (file-name globs) limits a folder to some files, e.g. just the tokenizer."""
    local = local_path(uri)
    if local is not None:
        return local
    store = Store(uri)
    files = store.find()
    if not files:
        store.check_readable("input")  # raises with the reason (no bucket, no key, credentials)
        raise UsageError(f"{uri}: no files there", "check the URI (kubetune stage copies inputs there)")
    tree = cache_root() / "trees" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    single = list(files) == [""]
    for key, info in sorted(files.items()):
        name = key or uri.rstrip("/").rsplit("/", 1)[-1]
        if key and (excluded(key, exclude) or (include and not excluded(key.rsplit("/", 1)[-1], include))):
            continue
        target = tree / name
        blob = cache_root() / "blobs" / hashlib.sha256(identity(info).encode()).hexdigest()
        fresh = not blob.exists()
        if fresh:
            _download(store, key, info, blob)
        if not target.exists() or target.stat().st_ino != blob.stat().st_ino:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            _link(blob, target)
        if on_file:
            on_file(key or name, fresh)
    return tree / (uri.rstrip("/").rsplit("/", 1)[-1]) if single else tree


def _download(store: Store, key: str, info: dict[str, Any], blob: Path) -> None:
    blob.parent.mkdir(parents=True, exist_ok=True)
    part = blob.with_name(f"{blob.name}.{os.getpid()}.download")  # two processes on one cache never share a part
    store.get(key, part)
    if not matches(part, info):
        got = part.stat().st_size
        part.unlink(missing_ok=True)
        raise UsageError(f"{store.url(key)}: the download ({got} bytes) does not match the stored size "
                         f"({size_of(info)} bytes) or checksum", "retry; if it persists, the object changed while "
                                                                 "it was read")
    os.replace(part, blob)


def md5_of(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
    except OSError:  # another filesystem: copy
        shutil.copy2(blob, target)
