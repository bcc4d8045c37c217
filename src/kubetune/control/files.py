"""Uploaded files: streamed to a temporary file within the size limit, checked to be JSON lines
(or a JSON array) of objects, then stored under the server's storage as files/FILE_ID/NAME — the
name the user gave, so a row's problems later read `train.jsonl:3: ...`."""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from kubetune.data.sources import read_file
from kubetune.errors import UsageError
from kubetune.storage.store import Store

__all__ = ["FileTooLarge", "new_file_id", "remove_upload", "save_upload", "safe_name"]

CHUNK = 1 << 20


class FileTooLarge(UsageError):
    pass


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def safe_name(filename: str) -> str:
    """The upload's own base name, reduced to characters that are safe in a path and a URI."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename or "upload.jsonl").name).strip("._") or "upload"
    return name if name.endswith((".jsonl", ".json")) else f"{name}.jsonl"


def save_upload(source: BinaryIO, filename: str, storage: str, owner: str, purpose: str, limit: int
                ) -> dict[str, Any]:
    """Store one upload and return its record; UsageError (a 400) when it is not JSON lines of
    objects, FileTooLarge (a 413) above `limit` bytes."""
    file_id, name = new_file_id(), safe_name(filename)
    with tempfile.TemporaryDirectory(prefix="kubetune-upload-") as tmp:
        local = Path(tmp) / name
        size = 0
        with local.open("wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise FileTooLarge(f"{filename}: larger than the server's upload limit of {limit:,} bytes",
                                       "split the file, or start the server with a larger --max-upload-mb")
                out.write(chunk)
        rows = _check(local, filename)
        uri = f"{storage.rstrip('/')}/files/{file_id}/{name}"
        store = Store(f"{storage.rstrip('/')}/files/{file_id}")
        store.put(local, name)
    return {"id": file_id, "owner": owner, "filename": filename or name, "purpose": purpose, "bytes": size,
            "rows": rows, "uri": uri, "created_at": int(time.time())}


def _check(local: Path, filename: str) -> int:
    """The number of rows; refuses what is not UTF-8 JSON (lines) of objects. Row-level problems
    (a missing assistant turn, a bad role) are the job's validation, which names file:line."""
    with local.open("rb") as fh:
        head = fh.read(8192)
    if b"\x00" in head:
        raise UsageError(f"{filename}: a binary file, not JSON lines", "upload a .jsonl file, one JSON object per line")
    try:
        rows, problems = read_file(local)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{filename}: not readable as JSON lines ({exc})", "upload UTF-8 JSON lines") from None
    if not rows:
        first = str(problems[0]).replace(str(local), filename) if problems else f"{filename}: no rows"
        raise UsageError(first, "upload a .jsonl file, one JSON object per line")
    if not isinstance(rows[0].data, dict):
        raise UsageError(f"{filename}:1: rows must be JSON objects, got {type(rows[0].data).__name__}",
                         "one object per line, e.g. {\"messages\": [...]}")
    return len(rows) + len(problems)


def remove_upload(uri: str) -> None:
    """The upload's folder (files/FILE_ID), wherever storage is."""
    Store(uri.rsplit("/", 1)[0]).remove("")
