"""Uploaded files: streamed to a temporary file within the size limit, checked to be JSON lines
(or a JSON array) of objects, then stored under the server's storage as files/FILE_ID/NAME — the
name the user gave, so a row's problems later read `train.jsonl:3: ...`."""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from kubetune.errors import UsageError
from kubetune.storage.store import Store

__all__ = ["FileTooLarge", "new_file_id", "remove_upload", "save_upload", "safe_name"]

CHUNK = 1 << 20
MAX_LINE = 4 << 20  # one row; a chat of 128k tokens is ~0.5 MiB


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
    """The number of rows; refuses what is not UTF-8 JSON lines of objects (or a small JSON array).
    Read a line at a time, so the server's memory does not grow with the file: an upload's rows are
    only counted here; row-level problems (a missing assistant turn, a bad role) are the job's
    validation, in its own process, which names file:line."""
    with local.open("rb") as fh:
        head = fh.read(8192)
    if b"\x00" in head:
        raise UsageError(f"{filename}: a binary file, not JSON lines", "upload a .jsonl file, one JSON object per line")
    if head.lstrip()[:1] == b"[":
        return _check_array(local, filename)
    rows, parsed, first_problem = 0, 0, None
    with local.open("rb") as fh:
        for number, line in enumerate(iter(lambda: fh.readline(MAX_LINE + 1), b""), 1):
            if len(line) > MAX_LINE:
                raise UsageError(f"{filename}:{number}: a line longer than {MAX_LINE >> 20} MiB",
                                 "one JSON object per line; split very long rows")
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise UsageError(f"{filename}:{number}: not UTF-8 text", "upload UTF-8 JSON lines") from None
            except (ValueError, RecursionError) as exc:
                first_problem = first_problem or f"{filename}:{number}: not valid JSON ({_short(exc)})"
                continue
            if not isinstance(row, dict):
                raise UsageError(f"{filename}:{number}: rows must be JSON objects, got {type(row).__name__}",
                                 "one object per line, e.g. {\"messages\": [...]}")
            parsed += 1
    if not parsed:
        raise UsageError(first_problem or f"{filename}: no rows", "upload a .jsonl file, one JSON object per line")
    return rows


def _check_array(local: Path, filename: str) -> int:
    if local.stat().st_size > MAX_LINE:
        raise UsageError(f"{filename}: a JSON array larger than {MAX_LINE >> 20} MiB",
                         "upload JSON lines (one object per line) instead")
    try:
        data = json.loads(local.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{filename}: not readable as JSON ({_short(exc)})", "upload UTF-8 JSON lines") from None
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{filename}: a JSON file must be an array of objects", "or upload JSON lines")
    return len(data)


def _short(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]


def remove_upload(uri: str) -> None:
    """The upload's folder (files/FILE_ID), wherever storage is."""
    Store(uri.rsplit("/", 1)[0]).remove("")
